"""The text pipeline without the CLI: HTML clean-up, tokenising, stable hashing, bigrams."""

import json
import random
import re
import subprocess
import sys

import numpy as np
import pytest

from mpirt.data.html import clean_html
from mpirt.data.synth import SynthText
from mpirt.data.textpipe import TextParams, process_lines
from mpirt.data.tokens import Hasher, check_features, tokenize


@pytest.mark.parametrize("html, words", [
    ("<p>Hello <b>World</b></p>", ["hello", "world"]),
    ("<div><ul><li>one<li>two</ul><p>three<span>four</span></p></div>", ["one", "two", "three", "four"]),
    ("a<br>b<br/>c", ["a", "b", "c"]),  # a tag separates words
    ("a<!-- <b>hidden</b> comment -->b", ["a", "b"]),
    ("a<!-- <script>x</script> -->b", ["a", "b"]),  # a script inside a comment does not open
    ("a<!--unclosed comment runs to the end", ["a"]),
    ("a<!-->b", ["a", "b"]),  # HTML5: <!--> is an empty comment
    ("x<script type='t'>var hidden = '<p>' + 1 < 2;</script>y", ["x", "y"]),
    ("x<script>s = '<!--';</script>y<!-- -->z", ["x", "y", "z"]),  # a comment opener inside a script
    ("x<SCRIPT>hidden</script >y", ["x", "y"]),
    ("x<STYLE>.hidden{}</STYLE>y<style media='a>b'>p{}</style>z", ["x", "y", "z"]),
    ("x<noscript>hidden</noscript>y<template><p>t</p></template>z", ["x", "y", "z"]),
    ("x<script>never closed", ["x"]),
    ("fish &amp; chips &#39;n&#39; caf&eacute; &#x41;&#66;c &nbsp;end", ["fish", "chips", "n", "café", "abc", "end"]),
    ("&lt;b&gt;escaped&lt;/b&gt;", ["b", "escaped", "b"]),  # escaped markup is visible text
    ('<a title="a>b" href=\'c>d\'>link</a> text', ["link", "text"]),
    ('<img alt="x > y" src="i.png">after', ["after"]),
    ("<![CDATA[kept text]]> after", ["kept", "text", "after"]),
    ("<!DOCTYPE html><?xml version='1.0'?><![if IE]>t<![endif]>", ["t"]),
    ("1 < 2 and 3 > 2", ["1", "2", "and", "3", "2"]),  # a lone '<' is text
    ("no markup at all_here", ["no", "markup", "at", "all", "here"]),
])
def test_html_cleanup(html, words):
    assert tokenize(clean_html(html)) == words


def test_html_cleanup_agrees_with_beautifulsoup_on_generated_documents():
    """An independent parser as the oracle: the same visible words on noisy generated HTML."""
    bs4 = pytest.importorskip("bs4")
    gen = SynthText(classes=3, seed=5)
    for text, _ in gen.rows(0, 150):
        soup = bs4.BeautifulSoup(text, "html.parser")
        for tag in soup(["script", "style", "noscript"]):
            tag.decompose()
        assert tokenize(clean_html(text)) == tokenize(soup.get_text(" "))
        assert not any(w.startswith("zz") for w in tokenize(clean_html(text))), "hidden content leaked"


@pytest.mark.parametrize("text, words", [
    ("Hello, World! x_y 42nd", ["hello", "world", "x", "y", "42nd"]),
    ("Ünïcödé ÉCOLE naïve café", ["ünïcödé", "école", "naïve", "café"]),
    ("a\u00a0b ©2024 — c", ["a", "b", "2024", "c"]),  # non-breaking space, symbols: not letters
    ("Москва, 北京 and ΣΊΣΥΦΟΣ.", ["москва", "北京", "and", "σίσυφος"]),  # final sigma, from the whole text
    ("", []),
])
def test_tokenizer(text, words):
    assert tokenize(text) == words


def test_tokenizer_matches_the_unicode_rule_on_random_text():
    """The fast byte paths give exactly ``[^\\W_]+`` over ``text.lower()``."""
    rule = re.compile(r"[^\W_]+")
    rng = random.Random(0)
    alphabet = "abcXYZ019_ -,.'\t\né\u00a0ÉİßΣσς日本\u0301\u0307!𝔘ǅ©"
    for _ in range(5000):
        pool = alphabet if rng.random() < 0.5 else "abcdefgh ,.XY" * 5 + alphabet
        text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 40)))
        assert tokenize(text) == rule.findall(text.lower()), repr(text)


def test_hashing_is_stable_across_processes():
    texts = ["the quick brown fox", "café Москва", "x" * 300]
    here = [Hasher(1 << 16, seed=7, bigrams=True).ids(t).tolist() for t in texts]
    code = ("import json, sys; from mpirt.data.tokens import Hasher;"
            "print(json.dumps([Hasher(1 << 16, seed=7, bigrams=True).ids(t).tolist() for t in json.loads(sys.argv[1])]))")
    there = subprocess.run([sys.executable, "-c", code, json.dumps(texts)], capture_output=True, text=True,
                           check=True, timeout=60, env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert json.loads(there.stdout) == here


def test_hash_is_the_documented_function():
    """docs/dataset-format.md: keyed BLAKE2b-64, little-endian, low bits."""
    import hashlib

    h = Hasher(1 << 20, seed=3)
    expect = int.from_bytes(hashlib.blake2b(b"word", digest_size=8, key=(3).to_bytes(8, "little")).digest(),
                            "little") & ((1 << 20) - 1)
    assert h.ids("Word").tolist() == [expect]


def test_seeds_and_sizes_change_the_buckets():
    words = " ".join(f"w{i}" for i in range(200))
    a = Hasher(1 << 16, seed=0).ids(words)
    assert not np.array_equal(a, Hasher(1 << 16, seed=1).ids(words))
    assert a.dtype == np.uint32 and a.max() < 1 << 16
    small = Hasher(1 << 4, seed=0).ids(words)
    assert small.max() < 16 and np.array_equal(small, a & 15), "buckets are the hash's low bits"


def test_hash_cache_is_bounded(monkeypatch):
    import mpirt.data.tokens as tokens

    monkeypatch.setattr(tokens, "CACHE_WORDS", 100)
    h = Hasher(1 << 12)
    first = h.ids(" ".join(f"w{i}" for i in range(80))).tolist()
    h.ids(" ".join(f"v{i}" for i in range(80)))
    assert len(h._cache) <= 100
    mixed = " ".join(f"v{i} u{i}" for i in range(40))  # old and new words past the bound at once
    assert h.ids(mixed).tolist() == Hasher(1 << 12).ids(mixed).tolist()
    assert h.ids(" ".join(f"w{i}" for i in range(80))).tolist() == first, "same ids after the cache emptied"


def test_bigrams_follow_each_rows_words():
    h = Hasher(1 << 20, bigrams=True)
    ids = h.ids("a b c")
    assert len(ids) == 5 and len(set(ids.tolist())) == 5
    plain = Hasher(1 << 20).ids("a b c")
    assert ids[:3].tolist() == plain.tolist(), "word ids first, then one id per adjacent pair"
    assert h.ids("b a").tolist()[2] != ids[3], "order matters"
    flat, lengths = h.ids_many(["a b c", "", "x", "p q"])
    assert lengths.tolist() == [5, 0, 1, 3], "n words give n + n-1 ids; no pair across rows"
    assert flat.tolist() == ids.tolist() + h.ids("x").tolist() + h.ids("p q").tolist()


@pytest.mark.parametrize("bad", [0, 1, 3, 1000, (1 << 32) + 1, 1 << 33])
def test_feature_counts_must_be_powers_of_two(bad):
    with pytest.raises(ValueError):
        check_features(bad)


def test_block_processing_keeps_rows_and_reports_bad_lines():
    lines = [json.dumps({"text": "<b>one</b> two", "label": "a"}).encode(), b"", b"{broken",
             json.dumps({"text": "x"}).encode(), json.dumps({"text": 5, "label": "a"}).encode(),
             json.dumps({"text": "three", "label": 7}).encode(), json.dumps({"text": "t", "label": True}).encode(),
             json.dumps([1, 2]).encode(), b"\xff\xfe"]
    res = process_lines(lines, TextParams(n_features=1 << 10))
    assert res.lines == len(lines) and res.rows.tolist() == [0, 5] and res.labels == ["a", 7]
    assert res.lengths.tolist() == [2, 1]
    assert [line for line, _ in res.bad] == [2, 3, 4, 6, 7, 8]
    assert "not valid JSON" in res.bad[0][1] and "no 'label' field" in res.bad[1][1]
