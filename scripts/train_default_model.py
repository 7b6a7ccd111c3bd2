"""Train rankdial's embedded default model: a small Llama on the King James Bible.

    python scripts/train_default_model.py                 # ~30 min on 2 CPU cores; writes src/rankdial/models/default
    python scripts/train_default_model.py --steps 20 --out /tmp/m   # a quick look

Corpus: the King James Version text from Debian's `bible-kjv-text` package (the KJV text is in the public
domain; the package's data is "for unrestricted use", see MODEL_CARD.md). The script dumps it with the
package's own `bible` program: installed (`apt-get install bible-kjv`) or, when it is not, fetched with
`apt-get download` and unpacked with `dpkg -x` into a temporary folder; no other network access.

Everything is fixed by --seed: the tokenizer (byte-level BPE, trained on the corpus), the order of the
batches and the initial weights, so the same machine gives the same file twice.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SPECIAL = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"]
# Each message is its role token, a newline, the content and <|endoftext|>; a generation prompt is
# "<|assistant|>\n". The content of an assistant turn plus its <|endoftext|> is what a chat fine-tune learns.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|endoftext|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def kjv_verses() -> list[tuple[str, str]]:
    """[(reference, text)] for all 31,102 verses, from Debian's bible-kjv(-text) packages."""
    exe, data = shutil.which("bible"), "/usr/lib/bible.data"
    tmp = None
    if exe is None or not os.path.exists(data):
        tmp = tempfile.mkdtemp(prefix="kjv-")
        subprocess.run(["apt-get", "download", "bible-kjv", "bible-kjv-text"], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)
        for deb in Path(tmp).glob("*.deb"):
            subprocess.run(["dpkg", "-x", str(deb), tmp + "/root"], check=True)
        exe, data = tmp + "/root/usr/bin/bible", tmp + "/root/usr/lib/bible.data"
    try:
        # -p names the folder holding bible.data; -f turns pretty-printing off (one "Ge1:1 text" line per verse)
        out = subprocess.run([exe, "-f", "-p", os.path.dirname(data), "gen1:1-rev22:21"], check=True,
                             capture_output=True, text=True).stdout
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    verses = []
    for line in out.splitlines():
        ref, _, text = line.partition(" ")
        if text:
            verses.append((ref, text.strip()))
    if len(verses) != 31102:
        sys.exit(f"expected 31102 verses from the bible program, got {len(verses)}")
    return verses


def chapters(verses: list[tuple[str, str]]) -> list[str]:
    """One document per chapter: its verses joined by spaces (references dropped)."""
    docs: dict[str, list[str]] = {}
    for ref, text in verses:
        docs.setdefault(ref.split(":")[0], []).append(text)
    return [" ".join(v) for v in docs.values()]


def train_tokenizer(docs: list[str], vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL[0], eos_token=SPECIAL[0],
                                   pad_token=SPECIAL[0], unk_token=None,
                                   additional_special_tokens=SPECIAL[1:])
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 512
    fast.save_pretrained(out)
    # Name the class every transformers release knows (5.x writes its new "TokenizersBackend").
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return fast


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "src/rankdial/models/default"))
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=4096)
    args = p.parse_args(argv)

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="default-model-"))
    verses = kjv_verses()
    docs = chapters(verses)
    tok = train_tokenizer(docs, args.vocab, work)
    eos = tok.convert_tokens_to_ids(SPECIAL[0])
    ids: list[int] = []
    for d in docs:
        ids.extend(tok(d, add_special_tokens=False)["input_ids"])
        ids.append(eos)
    stream = torch.tensor(ids, dtype=torch.long)
    # Hold out every 50th chapter-sized window for the reported evaluation loss.
    n_win = (len(stream) - 1) // args.seq
    windows = list(range(n_win))
    held = windows[::50]
    train = [w for w in windows if w % 50]
    print(f"corpus: {len(verses)} verses, {len(docs)} chapters, {len(stream):,} tokens; "
          f"{len(train)} train / {len(held)} eval windows of {args.seq}", flush=True)

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                      rms_norm_eps=1e-5, rope_theta=10000.0)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warm) / max(1, args.steps - warm))))

    def batch(win_ids):
        x = torch.stack([stream[w * args.seq: w * args.seq + args.seq + 1] for w in win_ids])
        return x[:, :-1], x[:, 1:]

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            losses = []
            for i in range(0, len(held), args.batch):
                x, y = batch(held[i:i + args.batch])
                logits = model(input_ids=x).logits
                losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item())
        model.train()
        return sum(losses) / len(losses)

    order: list[int] = []
    rng = random.Random(args.seed)
    model.train()
    loss_ema = None
    for step in range(args.steps):
        if len(order) < args.batch:
            more = train[:]
            rng.shuffle(more)
            order.extend(more)
        wins, order = order[:args.batch], order[args.batch:]
        x, y = batch(wins)
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        if step % 50 == 0 or step == args.steps - 1:
            el = time.time() - t0
            print(f"step {step + 1}/{args.steps} loss {loss.item():.3f} (ema {loss_ema:.3f}) "
                  f"lr {sched.get_last_lr()[0]:.2e} {el / 60:.1f} min", flush=True)
    eval_loss = evaluate()
    model.eval()
    prompt = tok("And God said", return_tensors="pt")
    torch.manual_seed(args.seed)
    sample = model.generate(**prompt, max_new_tokens=40, do_sample=False, pad_token_id=eos)
    sample_text = tok.decode(sample[0], skip_special_tokens=True)
    print(f"eval loss {eval_loss:.3f}; greedy sample: {sample_text!r}", flush=True)

    model.save_pretrained(work, safe_serialization=True)
    minutes = (time.time() - t0) / 60
    stats = {"parameters": n_params, "steps": args.steps, "batch": args.batch, "seq": args.seq,
             "tokens_seen": args.steps * args.batch * args.seq, "corpus_tokens": len(stream),
             "final_train_loss_ema": round(loss_ema, 4), "eval_loss": round(eval_loss, 4),
             "seed": args.seed, "lr": args.lr, "vocab_size": len(tok), "minutes": round(minutes, 1),
             "torch": torch.__version__, "greedy_sample": sample_text}
    (work / "training_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    card = Path(__file__).with_name("MODEL_CARD.template.md").read_text().format(**stats)
    (work / "MODEL_CARD.md").write_text(card)
    out = Path(args.out)
    samples = out / "samples"
    if samples.exists():  # the sample datasets are made by scripts/make_samples.py; keep them
        shutil.copytree(samples, work / "samples")
    if out.exists():
        shutil.rmtree(out)
    shutil.move(str(work), out)
    print(f"wrote {out} ({n_params:,} parameters, {minutes:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
