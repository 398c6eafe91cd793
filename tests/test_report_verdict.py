"""The report's verdict sentence, the coinciding-samplers note and the Markdown subset rendered in HTML, on a
results dict built by hand."""

from diffkd.evaluation.report import coinciding_samplers, inline_markdown, verdict


def _row(model, role, sampler, steps, fd, speedup=None, reference=False):
    return {"model": model, "role": role, "sampler": sampler, "steps": steps, "fd": fd, "speedup": speedup,
            "is_reference": reference}


RESULTS = {
    "protocol": {"feature_network": {"label": "FID"}},
    "models": [{"name": "teacher", "role": "teacher", "card_steps": None},
               {"name": "cifar-run", "role": "student", "card_steps": 4}],
    "rows": [_row("teacher", "teacher", "ddim", 64, 10.0, 1.0, reference=True),
             _row("teacher", "teacher", "ddim", 1, 300.0), _row("teacher", "teacher", "unipc", 1, 300.0),
             _row("teacher", "teacher", "ddim", 4, 45.0), _row("teacher", "teacher", "unipc", 4, 39.0),
             _row("cifar-run", "student", "own", 1, 40.0, 64.0), _row("cifar-run", "student", "own", 4, 15.0, 16.0)],
}


def test_verdict_states_ratios_to_the_reference_and_the_best_sampler_at_the_cards_steps():
    (line,) = verdict(RESULTS)
    # 15 / 10 = 1.50x the reference; best sampler at k=4 is unipc with 39: 39 / 15 = 2.60x better
    assert "**cifar-run**, 4 steps: FID 15" in line
    assert "1.50x the teacher's ddim-64 at 16.0x its speed" in line
    assert "2.60x better than unipc at 4 steps" in line


def test_coinciding_samplers_are_explained_only_where_they_coincide():
    note = coinciding_samplers(RESULTS)
    assert "k = 1:" in note and "first-order" in note
    assert coinciding_samplers({**RESULTS, "rows": RESULTS["rows"][3:]}) is None


def test_inline_markdown_renders_bold_and_code_and_escapes_the_rest():
    assert inline_markdown("**a** <b> `x`") == "<b>a</b> &lt;b&gt; <code>x</code>"
