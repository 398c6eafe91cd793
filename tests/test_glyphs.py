"""glyphs-32: deterministic, captions that say what is drawn, and a held-out split that training never sees."""

import torch

from diffkd import glyphs


def test_a_glyph_is_a_pure_function_of_seed_split_and_index():
    first = glyphs.glyph_set(12, seed=3)
    again = glyphs.glyph_set(12, seed=3)
    assert torch.equal(first.images, again.images) and first.captions == again.captions
    tail = glyphs.glyph_set(12, seed=3).images[5:]
    assert torch.equal(tail, first.images[5:])
    assert not torch.equal(glyphs.glyph_set(12, seed=4).images, first.images)


def test_every_caption_names_the_attributes_drawn():
    items = glyphs.glyphs(400, seed=1)
    assert {g.template for g in items} == set(range(len(glyphs.TEMPLATES)))
    for item in items:
        assert glyphs.caption_attributes(item.caption) == item.combination, item.caption


def test_caption_attributes_reads_hand_written_prompts():
    assert glyphs.caption_attributes("a red letter K on a blue background") == ("K", "red", "blue")
    assert glyphs.caption_attributes("7 in white on black") == ("7", "white", "black")
    assert glyphs.caption_attributes("a cat on a mat") is None


def test_the_drawn_colours_are_the_captioned_ones():
    drawn = glyphs.glyph_set(30, seed=2)
    for image, fg, bg in zip(drawn.images, drawn.labels["foreground"], drawn.labels["background"]):
        pixels = ((image + 1) * 127.5).round().reshape(3, -1).T
        palette = torch.tensor([glyphs.COLOURS[n] for n in glyphs.COLOUR_NAMES], dtype=torch.float32)
        distance, nearest = torch.cdist(pixels, palette).min(1)
        counts = torch.bincount(nearest[distance < 40], minlength=len(palette))  # pure pixels, not edge blends
        assert counts.argmax() == bg  # the background covers most of the image
        assert fg in counts.topk(2).indices  # and the character the next most


def test_heldout_combinations_are_a_tenth_and_never_in_training():
    heldout = glyphs.heldout_combinations()
    assert len(heldout) == round(0.1 * 36 * 8 * 7)
    assert not any(g.combination in heldout for g in glyphs.glyphs(3000, seed=0, split="train"))
    assert all(g.combination in heldout for g in glyphs.glyphs(300, seed=0, split="heldout"))
    seen = glyphs.glyphs(3000, seed=0, split="train")
    assert {g.character for g in seen} == set(glyphs.CHARACTERS)  # every attribute is still taught apart
