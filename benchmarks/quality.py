"""Does the fast CPU default cost quality? Perplexity on a fixed text and greedy answers to
factual questions, for float32 (the checkpoint's exact weights) against each faster option.

    python benchmarks/quality.py                       # default model: float32 vs auto
    python benchmarks/quality.py --configs auto w8a8 int4 bfloat16

`tests/test_quality.py` asserts the same on the default model.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine import LLM, SamplingParams
from engine.scheduler import ScheduledBatch

# Written for this check; plain expository prose a small instruct model has seen the like of.
TEXT = (
    "Bread is one of the oldest prepared foods. People were grinding grain and baking flat "
    "loaves on hot stones long before the first cities were built. A basic loaf needs only "
    "flour, water, salt and yeast. When the flour is mixed with water, two proteins in the "
    "wheat join to form gluten, a stretchy network that gives the dough its strength. Yeast "
    "feeds on the sugars in the flour and releases carbon dioxide, and the gas is trapped in "
    "the gluten, so the dough slowly rises. Bakers knead the dough to develop the gluten, "
    "then leave it in a warm place for an hour or two. After shaping, the loaf rises a second "
    "time before it goes into a hot oven. In the heat the gas expands, the yeast dies, and the "
    "starch sets into a soft crumb, while the surface dries and browns into a crust. The "
    "brown colour and much of the flavour come from reactions between sugars and proteins "
    "that only happen at high temperatures. Different flours, longer or shorter rising times "
    "and different ovens give the great variety of breads found around the world, from light "
    "white sandwich loaves to dense rye breads and flat breads cooked in a few minutes. "
    "Sourdough bread is raised by a starter, a mixture of flour and water in which wild "
    "yeasts and bacteria live together. The bacteria produce acids that give the bread its "
    "sour taste and help it keep for several days. Many families have kept the same starter "
    "alive for years by feeding it fresh flour and water every day."
)

# (question, a word every correct answer contains)
FACTS = [
    ("What is the capital of France?", "Paris"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the largest planet in our solar system?", "Jupiter"),
    ("Who wrote the play Romeo and Juliet?", "Shakespeare"),
    ("What gas do plants absorb from the air for photosynthesis?", "carbon dioxide"),
    ("What is the chemical formula of water?", "H2O"),
    ("What is the capital of Japan?", "Tokyo"),
    ("How many continents are there on Earth?", "seven"),
    ("What is the boiling point of water in degrees Celsius?", "100"),
    ("Which ocean is the largest?", "Pacific"),
    ("Who painted the Mona Lisa?", "Leonardo"),
    ("What is the capital of Italy?", "Rome"),
    ("How many legs does a spider have?", "eight"),
    ("Which animal is known as the king of the jungle?", "lion"),
    ("What is the freezing point of water in degrees Celsius?", "0"),
    ("In which country are the pyramids of Giza?", "Egypt"),
]

# Each config is a set of engine options; "float32" is the exact reference.
CONFIGS = {
    "float32": {"dtype": "float32"},
    "auto": {},  # measured once its background compile is done: the steady state
    "auto-eager": {"compile": "off"},  # what it serves during that compile
    "int8": {"dtype": "float32", "quantization": "int8"},  # float32 KV cache
    "w8a8": {"quantization": "w8a8"},  # with the default bfloat16 KV cache
    "int4": {"quantization": "int4"},
    "bfloat16": {"dtype": "bfloat16"},
}


@dataclass
class Quality:
    config: str
    perplexity: float
    answers: list[str]


@torch.inference_mode()
def perplexity(llm: LLM, text: str) -> float:
    """exp(mean negative log-likelihood) of the text's tokens after the first, computed in
    one prefill through the engine's own model and KV cache. The engine must be idle."""
    engine = llm.engine
    if engine.has_unfinished_requests():
        raise RuntimeError("perplexity() needs an idle engine")
    seq = engine.make_request("perplexity", text, SamplingParams(max_tokens=1)).seqs[0]
    engine.block_manager.allocate(seq.seq_id, seq.token_ids)
    try:
        # Every position is recomputed, so blocks shared with a prefix hit are swapped for
        # fresh ones (no copy needed) rather than overwritten.
        engine.block_manager.ensure(seq.seq_id, seq.num_tokens, 0)
        table = engine.block_manager.block_table(seq.seq_id)
        batch = ScheduledBatch(seqs=[seq], num_query_tokens=[seq.num_tokens])
        ids, pos, meta, _ = engine.runner._prepare(batch, [table])
        model = engine.runner.model
        logits = model.compute_logits(model(ids, pos, meta)[:-1]).float()
        return math.exp(F.cross_entropy(logits, ids[1:]).item())
    finally:
        engine.block_manager.free(seq.seq_id)


def answers(llm: LLM) -> list[str]:
    chats = [[{"role": "user", "content": q}] for q, _ in FACTS]
    params = SamplingParams(temperature=0, max_tokens=48)
    return [out.outputs[0].text for out in llm.chat(chats, params, use_tqdm=False)]


def evaluate(config: str, model: str) -> Quality:
    llm = LLM(model, enable_prefix_caching=False, **CONFIGS[config])
    llm.engine.wait_for_compile()
    return Quality(config, perplexity(llm, TEXT), answers(llm))


def correct(text: str, keyword: str) -> bool:
    return keyword.lower() in text.lower()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--configs", nargs="+", default=["auto"], choices=sorted(CONFIGS))
    args = p.parse_args()
    base = evaluate("float32", args.model)
    results = [base] + [evaluate(c, args.model) for c in args.configs if c != "float32"]
    print("| config | perplexity | vs float32 | correct answers | answers equal to float32 |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        right = sum(correct(a, k) for a, (_, k) in zip(r.answers, FACTS, strict=True))
        same = sum(a == b for a, b in zip(r.answers, base.answers, strict=True))
        print(
            f"| {r.config} | {r.perplexity:.3f} | {r.perplexity / base.perplexity:.4f}x "
            f"| {right}/{len(FACTS)} | {same}/{len(FACTS)} |"
        )
    for r in results:
        print(f"\n{r.config}:")
        for (q, _), a in zip(FACTS, r.answers, strict=True):
            print(f"  {q} -> {a.strip()[:100]!r}")


if __name__ == "__main__":
    main()
