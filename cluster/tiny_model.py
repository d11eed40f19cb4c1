"""A deterministic random-weight tiny Llama, built locally in seconds, for mechanism tests.

The tokenizer is a byte-level BPE trained on the small corpus below, so any text round-trips;
the weights are random (seeded), so output quality is meaningless but reproducible. The shapes
follow what vLLM's CPU attention supports (head_dim 32) and the chat format follows SmolLM2's
(ChatML, ``<|im_end|>`` as eos), so code written against the default model runs unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_SEED = 1234
VOCAB_SIZE = 768
# SmolLM2's order: ids 0, 1, 2.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|im_end|>"
BOS_TOKEN = "<|im_start|>"
UNK_TOKEN = "<|endoftext|>"

# SmolLM2's template with a different default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model with random weights.<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MODEL_SHAPE: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}

CORPUS = """\
The system answers the user. The assistant thinks step by step, checks its work, and then gives
a short final answer. A question comes in, the model writes a draft, a verifier reads the draft,
and the next round either accepts the answer or asks for a better one. Each round costs time and
tokens, so the server measures the cost of every round and stops when the answer is good enough.

Let us add two numbers. 17 + 25 = 42. First add the ones: 7 + 5 = 12, write 2 and carry 1. Then
add the tens: 1 + 2 + 1 = 4. So the answer is 42. Let us multiply: 12 * 13 = 156, because
12 * 10 = 120 and 12 * 3 = 36, and 120 + 36 = 156. Subtract: 100 - 37 = 63. Divide: 84 / 4 = 21.
The numbers 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 are digits; 10, 20, 30, 40, 50, 60, 70, 80, 90 are tens.

If all cats are animals and some animals are black, we cannot conclude that some cats are black.
If every square is a rectangle and this shape is a square, then this shape is a rectangle. A good
answer states the premises, applies one rule at a time, and says clearly what follows and what
does not. When the reasoning is unsure, the model should say so rather than guess.

A request travels from the client to the proxy, from the proxy to the ingress, and from the
ingress to a replica that runs the engine. The engine keeps a cache of keys and values for every
token it has seen. When a second round shares a prefix with the first, the cached blocks can be
reused, which saves the work of reading the prompt again. A scheduler decides which requests run
together in a batch; a longer batch uses the machine better but makes each request wait longer.

Once upon a time there was a small model that lived on a small computer. It could not do much,
but it was quick, and it always gave the same answer to the same question. The engineers were
happy with it, because tests that use it finish in seconds and never change from day to day.
The weather was cold in the morning and warm in the afternoon. She walked to the river, sat on
a stone, and watched the water. He read a book about the history of numbers, from counting on
fingers to the machines that now compute faster than anyone can write.

Questions: What is 3 + 4? What is 9 * 8? Which is larger, 0.5 or 0.25? How many days are in a
week? Answers: 7. 72. 0.5 is larger. There are 7 days in a week. The final answer is given in a
box, like this: the answer is 42. Please think carefully, explain briefly, and answer in one line.
def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i))
{"role": "user", "content": "Hello!"} {"role": "assistant", "content": "Hi, how can I help?"}
"""


def train_tokenizer(vocab_size: int = VOCAB_SIZE) -> Any:
    """Train a byte-level BPE (GPT-2 style, like SmolLM2's) on CORPUS; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # Every byte in the vocabulary: no text is ever unencodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    return tok


def _hf_tokenizer(tok: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _llama_config(tok: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        bos_token_id=tok.token_to_id(BOS_TOKEN),
        eos_token_id=tok.token_to_id(EOS_TOKEN),
        pad_token_id=tok.token_to_id(EOS_TOKEN),
        # Larger than the usual 0.02 so logits are not all near-ties: greedy output then
        # depends on the prompt, which makes mechanism tests more telling.
        initializer_range=0.2,
        **MODEL_SHAPE,
    )


def build_tiny_model(out: Path, *, seed: int = DEFAULT_SEED) -> None:
    """Write a complete HF folder (config, bf16 safetensors, tokenizer) into ``out``."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    tok = train_tokenizer()
    config = _llama_config(tok)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    _hf_tokenizer(tok).save_pretrained(out)
    log.debug("built tiny model in %s (vocab %d, seed %d)", out, config.vocab_size, seed)
