"""Independent oracles of the model side: float64 log-softmax on materialised logits of each
example alone, and argmax decoding one prompt at a time."""

from __future__ import annotations

import torch

from unlearn_kernels.data.formats import TokenizedPairs


def oracle_nll(model, data: TokenizedPairs) -> list[torch.Tensor]:
    """Each example alone (no padding), eval mode: −log_softmax(logits.double()) of its
    response tokens."""
    out = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for tokens, prompt_length in data.sequences():
            logits = model(input_ids=tokens[None]).logits[0].double()
            logp = torch.log_softmax(logits[:-1], -1).gather(1, tokens[1:, None])[:, 0]
            out.append(-logp[prompt_length - 1 :])
    model.train(was_training)
    return out


def greedy_oracle(model, prompt: torch.Tensor, steps: int, eos: int) -> list[int]:
    """Up to ``steps`` argmax tokens after ``prompt``, stopping before ``eos``."""
    ids = prompt.tolist()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == eos:
                break
            ids.append(nxt)
    model.train(was_training)
    return ids[prompt.numel() :]
