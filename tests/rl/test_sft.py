"""SFT data: conversations rendered with the chat template, scored on the assistant's tokens only; the sft stage
trains the sparse model on the synthesized tasks' reference trajectories.

Run: python -m pytest tests/rl/test_sft.py -q
"""
import json

import numpy as np
import pytest

from dsaforge.data.chat import ChatTemplate
from dsaforge.data.tokenizer import PAD, train_tokenizer
from dsaforge.model.train.data import IGNORE
from dsaforge.model.train.sft import ConversationRows, render_tokens

CONVERSATION = [
    {"role": "system", "content": "You solve problems by running Python."},
    {"role": "user", "content": "What is 17 * 23?"},
    {"role": "assistant", "content": "", "reasoning_content": "Multiply in the kernel.",
     "tool_calls": [{"name": "python", "arguments": {"code": "print(17 * 23)"}}]},
    {"role": "tool", "content": "391"},
    {"role": "assistant", "content": '{"answer": 391}', "reasoning_content": "It printed 391."},
]
TOOLS = [{"type": "function", "function": {"name": "python", "description": "Run code.",
                                           "parameters": {"type": "object", "properties": {"code": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def chat():
    texts = [json.dumps(CONVERSATION), "def f(x):\n    return x * 23\n" * 50, "answer reasoning kernel print"] * 20
    return ChatTemplate(train_tokenizer(texts, 400), thinking=True)


def test_only_the_assistants_segments_are_sampled(chat):
    ids, sampled = render_tokens(chat, CONVERSATION, TOOLS)
    assert ids == chat.encode(CONVERSATION, TOOLS, add_generation_prompt=False)
    sampled = np.array(sampled)
    runs, start = [], None          # the sampled spans, as text
    for i, s in enumerate([*sampled, False]):
        if s and start is None:
            start = i
        elif not s and start is not None:
            runs.append(chat.decode(ids[start:i]))
            start = None
    eos = "<｜end▁of▁sentence｜>"
    assert runs == [
        'Multiply in the kernel.</think><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>python<｜tool▁sep｜>'
        '{"code": "print(17 * 23)"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>' + eos,
        'It printed 391.</think>{"answer": 391}' + eos]
    # what a rollout samples is exactly what follows each generation prompt
    prompt = chat.encode(CONVERSATION[:2], TOOLS)
    assert ids[:len(prompt)] == prompt and not sampled[:len(prompt)].any() and sampled[len(prompt)]


def test_rows_score_only_assistant_tokens_and_pad(chat):
    ids, sampled = render_tokens(chat, CONVERSATION, TOOLS)
    pad = chat.tokenizer.token_to_id(PAD)
    rows = ConversationRows([(ids, sampled), (ids[:10], sampled[:10])], seq_len=len(ids) + 5, pad_id=pad)
    assert len(rows) == 1 and rows.dropped == 1             # the prompt-only conversation has nothing to score
    batch = rows.batch(np.array([0]))
    t = batch.targets[0]
    scored = (t != IGNORE).numpy()
    assert scored.sum() == sum(sampled[1:]) == rows.assistant_tokens and rows.truncated == 0
    assert (t[scored].numpy() == np.array(ids[1:])[np.array(sampled[1:])]).all()
    assert (batch.targets[0, len(ids) - 1:] == IGNORE).all() and (batch.inputs[0, len(ids):] == pad).all()
    first = sampled.index(True)
    short = ConversationRows([(ids, sampled)], seq_len=first + 3, pad_id=pad)
    assert short.truncated == 1 and short.batch(np.array([0])).inputs.shape == (1, first + 3)
    # a row whose assistant tokens all lie beyond seq_len has nothing to score: left out, counted
    none = ConversationRows([(ids, sampled)], seq_len=first - 1, pad_id=pad)
    assert len(none) == 0 and none.dropped == 1


@pytest.mark.parametrize("mtp", [0, 1])
def test_sft_padding_does_not_count_in_the_expert_load(chat, mtp):
    """sft pads each conversation to train.sft.seq_len: the router-bias update must see the load of the unpadded
    conversations (MTP layers included), not mostly PAD tokens."""
    import torch

    from dsaforge.model import MoE
    from dsaforge.model.train.data import micro_batches
    from dsaforge.model.train.trainer import forward_lm
    from tests.model.model_helpers import make_model

    long, short = render_tokens(chat, CONVERSATION, TOOLS), render_tokens(chat, CONVERSATION[:3], TOOLS)
    rows = ConversationRows([long, short], seq_len=len(long[0]) + 20, pad_id=chat.tokenizer.token_to_id(PAD))
    model = make_model(seed=3, n_mtp_layers=mtp).train()
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(moes) == model.n_moe_layers + mtp

    def loads(run):
        for m in moes:
            m.expert_load.zero_()
        run()
        return torch.stack([m.expert_load.clone() for m in moes])

    batch = rows.batch(np.array([0, 1]))
    assert batch.valid.sum(1).tolist() == [len(long[0]), len(short[0])]
    micro = [mb.to("cpu") for mb in micro_batches(batch, 1)]                 # the trainer's path keeps the mask
    assert torch.equal(torch.cat([mb.valid for mb in micro]), batch.valid)
    padded = loads(lambda: forward_lm(model, batch.inputs, batch.targets, "dense", valid=batch.valid))
    alone = loads(lambda: [model(torch.tensor([ids]), mode="dense") for ids, _ in (long, short)])
    with_padding = loads(lambda: forward_lm(model, batch.inputs, batch.targets, "dense"))
    k, n = model.cfg.n_activated_experts, len(long[0]) + len(short[0])
    print(f"load counted: unpadded {int(alone.sum())}, masked {int(padded.sum())}, unmasked {int(with_padding.sum())}")
    assert torch.equal(padded, alone)
    assert alone[:model.n_moe_layers].sum() == model.n_moe_layers * n * k
    assert alone[model.n_moe_layers:].sum() == mtp * (n - 2) * k          # MTP: position i needs token i + 1
    assert with_padding.sum() > padded.sum()                              # what sft counted before the mask
