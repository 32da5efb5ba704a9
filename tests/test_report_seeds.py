"""bench.report_seeds: a claim holds only when every training seed's report finds it, same sign."""
from bench import report_seeds


def metrics(tests, sites):
    return {"checkpoints": {"sft": {}, "grpo": {"patching": {
                "declared": ["stoney/answer"], "groups": {"stoney/answer": {"sites": sites}}}}},
            "headline": {"tests": tests}}


def claim(kind, diff, sig, checkpoint="grpo", **kw):
    return {"kind": kind, "checkpoint": checkpoint, "diff": diff, "significant": sig, **kw}


def site(name, mean, passes):
    return {"site": name, "mean": mean, "passes": passes}


def test_claims_hold_only_in_every_seed_with_one_sign():
    seeds = [metrics([claim("lens_first", -0.6, True), claim("topk_vs_random", 1.2, True, family="math"),
                      claim("entropy_answer", 0.1, True, layer=1), claim("topk_vs_random", 9.0, True, "sft",
                                                                             family="math")],
                     [site("head/1.2", 2.0, True), site("resid/pos/0", 0.5, True)]),
             metrics([claim("lens_first", -0.4, True), claim("topk_vs_random", 0.9, False, family="math"),
                      claim("entropy_answer", -0.2, True, layer=1)],
                     [site("head/1.2", 1.5, True)])]
    claims = report_seeds.pool([report_seeds.claims_of(m) for m in seeds])
    assert claims["lens_first"]["every_seed"] and claims["lens_first"]["pooled"] == -0.5
    assert not claims["topk_vs_random math"]["every_seed"]            # not significant in seed 1
    assert not claims["entropy_answer 1"]["every_seed"]               # significant both times, opposite signs
    assert claims["patch stoney/answer head/1.2"]["every_seed"]
    assert not claims["patch stoney/answer resid/pos/0"]["every_seed"]  # missing in seed 1
    assert claims["patch stoney/answer resid/pos/0"]["per_seed"][1] is None
    assert all("sft" not in c for c in claims) and len(claims) == 5   # the last checkpoint only
    md = report_seeds.summary_md(claims, 2)
    assert "| lens_first | -0.6 ✓ | -0.4 ✓ | -0.5 [-0.6, -0.4] | yes |" in md
