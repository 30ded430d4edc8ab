"""Realistic noisy HTML documents for scale tests: Zipf vocabulary, class topic words, markup noise.

Every document is a function of (seed, row number) only: rows are generated in
fixed blocks of :data:`GEN_ROWS`, each from its own seeded generator, so any
range of rows can be generated on its own (in parallel workers, in any block
size) and ``--rows 1000`` is a prefix of ``--rows 1000000``.

What a document looks like: a doctype, ``<head>`` with a title, ``<meta>`` tags
and sometimes a ``<style>`` block; a ``<body>`` with a nav bar of links, headings
and paragraphs of sentences (capitalised, punctuated) drawn from a Zipf(1.1)
vocabulary of pseudo-words, about 12% of them topic words of the document's
class; inline tags with attributes (some quoted values hold ``>``), character
references (``&amp;``, ``&nbsp;``, ``caf&eacute;``, ``&#39;``, ``&#x2014;``), comments
(some with tags inside), CDATA, and ``<script>`` blocks whose code holds ``<``,
``-->`` and tag-like strings. Words that must never survive cleaning (script,
style and comment contents) start with ``zz``.
"""

import json

import numpy as np

GEN_ROWS = 1024
_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "shi", "pe", "ga", "do", "li", "ze", "bu", "fa",
              "xo", "qui", "tro", "an", "el", "or", "um", "is", "en"]
_INLINE = ["b", "i", "em", "strong", "span", "code", "small", "mark"]
_ENTITY_WORDS = ["caf&eacute;", "na&iuml;ve", "&Uuml;ber", "r&eacute;sum&eacute;", "fa&ccedil;ade"]
_SEPARATORS = ["&amp;", "&nbsp;", "&#39;", "&quot;", "&lt;3", "&#x2014;", "&mdash;", "&gt;"]
_STYLES = ["<style>body{margin:0} .zzstyle>p{color:red}</style>",
           "<STYLE type=\"text/css\">/* zzstylecomment */ a:hover{x:1}</STYLE>"]
_SCRIPTS = ["<script>var zzscript = 1 < 2 && \"</div>\"; // -->\n</script>",
            "<script type=\"text/javascript\">if (a<b) { zzjs('<p>x</p>'); }</script>",
            "<noscript>zznoscript enable javascript</noscript>"]
_COMMENTS = ["<!-- zzcomment -->", "<!-- <p>zzhidden</p> -->", "<!--[if IE]><b>zzie</b><![endif]-->"]


class SynthText:
    """A deterministic generator of labelled HTML documents.

    Args:
        classes: number of classes (>= 1); labels are ``topic_0`` ... ``topic_{C-1}``.
        seed: everything is a function of the seed and the row number.
        vocab: vocabulary size (word of rank r has probability ~ 1/r^1.1).
        topic_words: words per class topic, drawn from below the 500 most frequent words.
    """

    def __init__(self, classes=4, seed=0, vocab=50_000, topic_words=150):
        if classes < 1:
            raise ValueError("classes must be >= 1")
        rng = np.random.default_rng([seed, 2**31])
        self.classes, self.seed = classes, seed
        syl = np.array(_SYLLABLES)
        lengths = rng.integers(2, 5, size=vocab)
        words = ["".join(syl[rng.integers(0, len(syl), size=k)]) + str(i % 7 or "") for i, k in enumerate(lengths)]
        self.words = np.array(words, dtype=object)
        self.capital = np.array([w.capitalize() for w in words], dtype=object)
        p = 1.0 / np.arange(1, vocab + 1) ** 1.1
        self.cdf = np.cumsum(p / p.sum())
        self.topics = [rng.choice(np.arange(500, vocab), size=topic_words, replace=False) for _ in range(classes)]
        self.class_names = [f"topic_{c}" for c in range(classes)]

    def rows(self, start, count):
        """Rows [start, start + count) as a list of (html, label) pairs."""
        out = []
        first = start // GEN_ROWS
        for b in range(first, (start + count - 1) // GEN_ROWS + 1 if count > 0 else first):
            docs = self._block(b)
            lo, hi = max(start - b * GEN_ROWS, 0), min(start + count - b * GEN_ROWS, GEN_ROWS)
            out.extend(docs[lo:hi])
        return out

    def jsonl_lines(self, start, count):
        """Rows [start, start + count) as JSONL lines (bytes, no newline): ``{"text": ..., "label": ...}``."""
        dumps = json.dumps
        return [dumps({"text": t, "label": y}).encode() for t, y in self.rows(start, count)]

    def _block(self, b):
        rng = np.random.default_rng([self.seed, b])
        n = GEN_ROWS
        labels = rng.integers(0, self.classes, size=n)
        lengths = np.clip(rng.lognormal(4.3, 0.6, size=n).astype(np.int64), 5, 1500)
        total = int(lengths.sum())
        idx = np.searchsorted(self.cdf, rng.random(total))
        topical = np.flatnonzero(rng.random(total) < 0.12)
        row_of = np.repeat(np.arange(n), lengths)
        topic_table = np.stack(self.topics)
        idx[topical] = topic_table[labels[row_of[topical]], rng.integers(0, topic_table.shape[1], len(topical))]
        idx = np.minimum(idx, len(self.words) - 1)
        noise = rng.random(total)
        # Sentence starts are capitalised: roughly every 12th word.
        plain = np.where(rng.random(total) < 1 / 12, self.capital[idx], self.words[idx]).tolist()
        body = list(plain)
        deco = np.flatnonzero(noise < _DECORATED)
        for p, r in zip(deco.tolist(), noise[deco].tolist()):  # markup on ~16% of the words only
            body[p] = _decorate(body[p], r)
        extras = rng.random((n, 2)).tolist()
        names = [self.class_names[c] for c in labels.tolist()]
        docs, a = [], 0
        for i, e in enumerate(np.cumsum(lengths).tolist()):
            title, h1 = " ".join(plain[a:a + 4]), " ".join(plain[a + 4:a + 8])
            docs.append((_document(title, h1, " ".join(body[a + 8:e]), extras[i]), names[i]))
            a = e
        return docs


_DECORATED = 0.161


def _decorate(w, r):
    """A word with the markup noise ``r`` (uniform in [0, _DECORATED)) asks for."""
    if r < 0.04:
        tag = _INLINE[int(r * 200)]
        return f'<{tag} class="c{int(r * 1000)}">{w}</{tag}>'
    if r < 0.05:
        return f'<a href="http://example.org/{w}?q={w}&amp;p=2" data-x=\'1>0\'>{w}</a>'
    if r < 0.06:
        return f"{w} {_SEPARATORS[int(r * 800) % len(_SEPARATORS)]}"
    if r < 0.063:
        return f"{w} {_ENTITY_WORDS[int(r * 10000) % len(_ENTITY_WORDS)]}"
    if r < 0.066:
        return f"{_COMMENTS[int(r * 10000) % len(_COMMENTS)]}{w}"
    if r < 0.1:
        return f"{w},"
    if r < 0.14:
        return f"{w}."
    if r < 0.16:
        return f"{w}.</p>\n<p>"
    return f"<br/>{w}<![CDATA[{w}]]>"


def _document(title, h1, body, extra):
    style = _STYLES[int(extra[0] * 4)] if extra[0] < 0.5 else ""
    script = _SCRIPTS[int(extra[1] * 7.5)] if extra[1] < 0.4 else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>{style}'
            f'</head>\n<body class="page"><nav><a href="/home?a=1&amp;b=2">Home</a> | '
            f'<a href="/about" title="x > y">About us</a></nav>\n<h1>{h1}</h1>\n<p>{body}</p>\n{script}'
            f"<footer><p>&copy; 2024 Example &amp; Co</p></footer></body></html>")

def write_jsonl(path, n, classes=4, seed=0, workers=1):
    """Write ``n`` synthetic documents to ``path`` as JSONL (atomically).

    Args:
        path: output file.
        n: rows.
        classes, seed: see :class:`SynthText`.
        workers: processes generating blocks in parallel (the file is the same for any number).

    Returns:
        The number of bytes written.
    """
    from mpirt.atomic import atomic_path
    from mpirt.data.textpipe import ordered_map

    calls = ((_lines_blob, (classes, seed, s, min(8 * GEN_ROWS, n - s))) for s in range(0, n, 8 * GEN_ROWS))
    size = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for blob in ordered_map(calls, workers):
            f.write(blob)
            size += len(blob)
    return size


_generators = {}


def _lines_blob(classes, seed, start, count):
    key = (classes, seed)
    if key not in _generators:
        _generators[key] = SynthText(classes=classes, seed=seed)
    return b"\n".join(_generators[key].jsonl_lines(start, count)) + b"\n"
