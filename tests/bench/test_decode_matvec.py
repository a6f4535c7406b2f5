"""bench/decode_matvec.py's chains: the parameter counts its ratios divide by, on a tiny
chain. No timing assertions."""

from bench import decode_matvec


def test_factored_chains_hold_their_share_of_the_parameters(monkeypatch):
    monkeypatch.setattr(decode_matvec, "BLOCKS", 1)
    monkeypatch.setattr(decode_matvec, "STEPS", 2)
    res = decode_matvec._child(rounds=1)
    assert set(res) == {"dense"} | {
        f"params={r}{s}" for r in (0.8, 0.6) for s in ("", ", 2 halves")
    }
    dense = sum(m * n for m, n in decode_matvec.SHAPES)
    assert res["dense"]["params"] == dense
    for ratio in decode_matvec.RATIOS:
        for name, even in ((f"params={ratio}", 1), (f"params={ratio}, 2 halves", 2)):
            ranks = [int(ratio * m * n / (m + n)) for m, n in decode_matvec.SHAPES]
            ranks = [r - r % even for r in ranks]
            factored = sum(r * (m + n) for r, (m, n) in zip(ranks, decode_matvec.SHAPES))
            assert res[name]["params"] == factored
            assert ratio - 0.01 < factored / dense <= ratio
    assert all(r["ms_per_step"] > 0 for r in res.values())
