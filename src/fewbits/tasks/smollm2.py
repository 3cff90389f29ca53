"""smollm2: SmolLM2-135M-Instruct, a Llama-architecture causal language model, on real text.

Perplexity on WordNet noun definitions of synsets the calibration never saw, and on Python
standard-library docstrings (a second corpus); agreement with fp32 on the next token and on
greedy continuations of fixed prompts. Calibration: definitions of the first noun synsets and
docstrings of other standard-library modules than the evaluated ones, alternating window by
window (calibrated on WordNet text alone, GPTQ fitted the weights to it and scored worse on the
docstrings than round-to-nearest).
Windows of 256 tokens, each scored on its own.

The model was published with Q4_1 weights (4-bit, blocks of 32 with a scale and a minimum), so
re-quantizing to 4-bit asymmetric groups of 32 is nearly lossless by construction; symmetric
groups of 128, per-channel 4-bit, 3 and 2 bits and quantized activations are the real tests.
"""
from __future__ import annotations

import torch

from .base import Task
from .causal_lm import causal_lm_task, windows
from .data.docstrings import CALIBRATION_MODULES, stdlib_docstrings
from .data.wordnet import read_glosses
from .models.smollm2 import load_smollm2

LENGTH = 256
CALIBRATION_SYNSETS = 3000  # definitions 0 … 2999 may be calibration text, the evaluation starts at
EVAL_FROM = 20000           # synset 20,000 (nouns are in file order: far apart in the hierarchy)
PROMPTS = (  # two lengths under this tokenizer (5 and 6 tokens): greedy decoding runs them as two batches
    "The capital of France is", "The three primary colors are", "The opposite of hot is", "import numpy as np\n",
    "The Pythagorean theorem states that", "Shakespeare wrote the play",
    "Water boils at a temperature of", "def fibonacci(n):", "A group of crows is called",
    "The chemical symbol for gold is", "The speed of light is about", "The main ingredient of bread is")


def smollm2_task(small: bool = False) -> Task:
    model, tokenizer = load_smollm2()
    n_cal, n_eval, new = (2, 1, 6) if small else (16, 8, 16)
    glosses = [definition for definition, _ in read_glosses("noun", EVAL_FROM + 2000)]

    def ids(texts):
        return tokenizer("\n".join(texts), return_tensors="pt").input_ids[0]

    nouns = windows(ids(glosses[:CALIBRATION_SYNSETS]), LENGTH, n_cal // 2, "smollm2 calibration (WordNet)")
    code = windows(ids(stdlib_docstrings(CALIBRATION_MODULES)), LENGTH, n_cal // 2, "smollm2 calibration (docstrings)")
    calibration = list(torch.stack([nouns, code], 1).reshape(-1, LENGTH).split(2))  # each batch: one of each
    corpora = {"wordnet": windows(ids(glosses[EVAL_FROM:]), LENGTH, n_eval, "smollm2 WordNet evaluation"),
               "docstrings": windows(ids(stdlib_docstrings()), LENGTH, n_eval, "smollm2 docstring evaluation")}
    prompts = [tokenizer(p, return_tensors="pt").input_ids[0] for p in (PROMPTS[:2] if small else PROMPTS)]
    return causal_lm_task("smollm2", "SmolLM2-135M-Instruct (Llama, 30 layers): perplexity on "
                          f"{n_eval * LENGTH} tokens of held-out WordNet definitions and of stdlib docstrings",
                          model, calibration, corpora, prompts, new_tokens=new)
