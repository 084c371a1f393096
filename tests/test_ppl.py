import math

import torch

from harness.evals.ppl import make_windows, perplexity, window_nlls


def test_windows_non_overlapping_drop_tail():
    ids = torch.arange(10)
    w = make_windows(ids, 4)
    assert w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert make_windows(ids, 4, max_tokens=5).tolist() == [[0, 1, 2, 3]]


def test_windows_with_bos():
    w = make_windows(torch.arange(1, 8), 4, bos_id=0)
    assert w.tolist() == [[0, 1, 2, 3], [0, 4, 5, 6]]


class _Uniform(torch.nn.Module):
    """Predicts token t+1 = t + 1 with prob p, the rest uniform over V."""

    def __init__(self, V, p):
        super().__init__()
        self.V, self.p = V, p
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        V, p = self.V, self.p
        probs = torch.full((*input_ids.shape, V), (1 - p) / (V - 1))
        probs.scatter_(-1, ((input_ids + 1) % V).unsqueeze(-1), p)
        return type("Out", (), {"logits": probs.log()})()


def test_ppl_matches_hand_computation():
    V, p = 8, 0.5
    ids = torch.tensor([0, 1, 2, 5, 6, 7, 0, 3])  # windows [0,1,2,5], [6,7,0,3]
    nll = window_nlls(_Uniform(V, p), make_windows(ids, 4), batch_size=2)
    hit, miss = -math.log(p), -math.log((1 - p) / (V - 1))
    # window 1: 0->1 hit, 1->2 hit, 2->5 miss; window 2: 6->7 hit, 7->0 hit, 0->3 miss
    expected = (2 * hit + miss) / 3
    torch.testing.assert_close(nll, torch.tensor([expected, expected]))
    assert math.isclose(perplexity(nll), math.exp(expected), rel_tol=1e-6)
