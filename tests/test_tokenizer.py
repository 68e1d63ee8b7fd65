"""The CLIP tokenizer against transformers' CLIPTokenizer (Rust-backed) built from the same
files, on a few hundred varied prompts, in each file layout jdiff reads."""

import json
import random

import numpy as np
import pytest
import transformers

from jdiff.tokenizer import CLIPTokenizer

FRAGMENTS = [
    "a photo of a cat", "A red circle at the TOP LEFT", "an astronaut riding a horse on mars",
    "don't", "it's", "I'M", "we've", "they'll", "she'd", "you're", "o'clock", "rock'n'roll",
    "Hello, World!!", "what?!", "...", "--", "(masterpiece:1.2)", "[blue]", "{x}", "#hashtag",
    "@user", "e-mail@example.com", "https://example.com/a?b=c&d=e", "C++", "50%", "$100",
    "3.14159", "1,000,000", "2024-11-25", "4k", "8K UHD", "x2", "v1.5",
    "café", "naïve", "Crème brûlée", "e\u0301te\u0301", "straße", "ΣΊΣΥΦΟΣ", "Ελληνικά",
    "Москва зимой", "東京の夜景", "北京", "서울", "ผู้หญิง", "עברית", "العربية", "हिन्दी",
    "🙂", "🐱‍👤", "👍🏽", "🇫🇷", "❤️", "👨‍👩‍👧‍👦", "emoji🙂inline", "★☆", "™", "©", "°C", "½",
    "\tindented", "line\nbreak", "multiple   spaces", "\u00a0nbsp\u00a0", "zero\u200bwidth",
    "trailing ", " leading", "UPPER lower MiXeD", "İstanbul", "ǅ", "ﬁ ligature",
    "<|endoftext|>", "a <|startoftext|> b", "<|ENDOFTEXT|>", "!!!", "a!", "hi!bye",
    "highly detailed, digital painting, artstation, concept art, sharp focus, illustration",
]  # fmt: skip


def prompts() -> list[str]:
    rng = random.Random(0)
    out = ["", " ", *FRAGMENTS]
    for _ in range(300):
        out.append(" ".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 8))))
    for _ in range(20):  # longer than 77 tokens: truncated
        out.append(", ".join(rng.choice(FRAGMENTS) for _ in range(40)))
    return out


def reference_ids(tokenizer, texts) -> np.ndarray:
    ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    return np.asarray(ids)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tokenizer folder as diffusers-format SD 1.x directories hold it, written from the
    merges file jdiff ships."""
    ours = CLIPTokenizer.default()
    path = tmp_path_factory.mktemp("tokenizer")
    (path / "vocab.json").write_text(json.dumps(ours.vocab, ensure_ascii=False))
    merges = sorted(ours.ranks, key=ours.ranks.get)
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges))
    return path


def test_known_token_ids():
    ids = CLIPTokenizer.default()(["a photo of a cat"])
    assert ids.shape == (1, 77) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids[0, :7], [49406, 320, 1125, 539, 320, 2368, 49407])
    assert (ids[0, 7:] == 49407).all()  # SD 1.x pads with the end token
    assert len(CLIPTokenizer.default().vocab) == 49408


def test_matches_transformers_vocab_and_merges(folder):
    reference = transformers.CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt")
    )
    texts = prompts()
    ours = CLIPTokenizer.from_pretrained(folder)(texts)
    expected = reference_ids(reference, texts)
    mismatches = [t for t, a, b in zip(texts, ours, expected, strict=True) if (a != b).any()]
    assert not mismatches, mismatches[:5]
    np.testing.assert_array_equal(CLIPTokenizer.default()(texts), expected)


def test_matches_transformers_tokenizer_json_with_sd2_padding(folder, tmp_path):
    """SD 2.x pads with "!" (id 0), which transformers also splits out of prompts as a special
    token; the folder has only tokenizer.json and tokenizer_config.json."""
    reference = transformers.CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), pad_token="!"
    )
    reference.save_pretrained(tmp_path)
    assert not (tmp_path / "vocab.json").exists() and (tmp_path / "tokenizer.json").exists()
    reference = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    texts = prompts()
    ours = CLIPTokenizer.from_pretrained(tmp_path)
    assert ours.pad_id == 0 and ours.max_length == 77
    np.testing.assert_array_equal(ours(texts), reference_ids(reference, texts))
    np.testing.assert_array_equal(ours(["hi!"])[0, :4], [49406, 1883, 0, 49407])


def test_truncation_decode_and_errors(tmp_path):
    tokenizer = CLIPTokenizer.default()
    long = " ".join(["red"] * 100)
    ids = tokenizer([long])[0]
    assert ids[0] == 49406 and ids[-1] == 49407 and (ids[1:-1] == ids[1]).all()
    assert (
        tokenizer.decode(tokenizer(["A Red circle, at 10:30!"])[0])
        == "a red circle , at 1 0 : 3 0 !"
    )
    assert tokenizer(["x"], max_length=8).shape == (1, 8)
    with pytest.raises(ValueError, match="no prompts"):
        tokenizer([])
    with pytest.raises(TypeError, match="must be a str"):
        tokenizer([None])
    with pytest.raises(FileNotFoundError, match=r"neither vocab\.json"):
        CLIPTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pad_token"):
        CLIPTokenizer.default(pad_token="<pad>")
