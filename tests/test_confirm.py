"""The trigger search of rule 4 (auditor/confirm.py) on a landscape built to test one step."""

from __future__ import annotations

import numpy as np
import pytest
import torch


class _Landscape:
    """A stand-in for a Miner whose 'outputs' make the loss of a two-token trigger
    min(|e - (w_b, w_a)|^2 + 0.5, |e - (w_a, w_b)|^2): the pieces of a word in the wrong slots
    are a local optimum that every one-slot change makes worse, the right order is the global
    one (loss 0), as with a trigger word of two pieces ('z' '##q') found as '##q' 'z'."""

    def __init__(self, a: int, b: int, vocab: int = 6, dim: int = 4) -> None:
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, dim)
        with torch.no_grad():
            self.emb.weight.copy_(3 * torch.randn(vocab, dim, generator=g))
        self.a, self.b = a, b

    def _forward_prompted(self, idx: np.ndarray, embeds: torch.Tensor,
                          rng: np.random.Generator) -> dict[str, torch.Tensor]:
        w = self.emb.weight.detach()
        wrong = ((embeds[0] - w[self.b]) ** 2).sum() + ((embeds[1] - w[self.a]) ** 2).sum()
        right = ((embeds[0] - w[self.a]) ** 2).sum() + ((embeds[1] - w[self.b]) ** 2).sum()
        loss = torch.minimum(wrong + 0.5, right)
        return {"cls": loss.sqrt().expand(len(idx), 1)}  # the search's loss: mean (f - 0)^2


@pytest.mark.parametrize("pair_k, reached", [(0, False), (6, True)])
def test_the_search_leaves_a_one_slot_optimum_by_changing_two_slots(pair_k, reached) -> None:
    from lmsan.auditor.confirm import ConfirmRule, _search

    land = _Landscape(a=2, b=4)
    w = land.emb.weight.detach()
    # the precondition: from the swapped start every one-slot change raises the loss
    start = torch.tensor([4, 2])
    rs = np.random.default_rng(0)
    base = float(land._forward_prompted(np.arange(3), w[start], rs)["cls"][0] ** 2)
    for j in range(2):
        for v in range(6):
            t = start.clone()
            t[j] = v
            if not torch.equal(t, start):
                lo = float(land._forward_prompted(np.arange(3), w[t], rs)["cls"][0] ** 2)
                assert lo > base
    rule = ConfirmRule(pair_k=pair_k)
    found = _search(land, start, np.arange(3), "cls", torch.zeros(1), rule,
                    torch.arange(6), seed=0)
    assert torch.equal(found, torch.tensor([2, 4])) is reached
    if not reached:
        assert torch.equal(found, start)  # one-slot moves alone stop at the swapped pieces


def _bare_miner(clean: dict, ids: list[list[int]]):
    from lmsan.auditor.mining import Miner, MiningConfig

    m = Miner.__new__(Miner)  # only what clean_match reads
    m.cfg, m.clean, m.ids = MiningConfig(), clean, ids
    m._clean_signs, m._clean_rows_of = {}, {}
    return m


def test_clean_match_leaves_out_the_sentences_that_hold_the_trigger() -> None:
    """Rule 4's landing figure counts clean outputs at a point among sentences without the
    trigger's tokens: sentences that contain a frequent-word trigger land on its PV themselves
    and must not make the PV look like ordinary clean text."""
    pv = np.array([1.0, -1.0, 1.0, -1.0, 1.0])
    at, away = torch.tensor(pv, dtype=torch.float32), torch.tensor(-pv, dtype=torch.float32)
    ids = [[5, 7, 9], [7, 8], [5, 6], [6, 9]]  # token 7 in the first two sentences
    m = _bare_miner({"cls": [at, at, away, away]}, ids)
    assert m.clean_match("cls", pv) == 0.5
    assert m.clean_match("cls", pv, without=[7]) == 0.0
    assert m.clean_match("cls", pv, without=[6]) == 1.0  # the two left both sit at the PV
    assert m.clean_match("cls", pv, without=[5, 6, 7, 8, 9]) == 1.0  # nothing left: clean text
    # per-token outputs: a sentence's rows go or stay together
    tok = _bare_miner({"tokens": [torch.stack([at, at, at]), torch.stack([at, away]),
                                  torch.stack([away, away]), torch.stack([away, away])]}, ids)
    assert tok.clean_match("tokens", pv) == 4 / 9
    assert tok.clean_match("tokens", pv, without=[7]) == 0.0
