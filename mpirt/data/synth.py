"""Realistic noisy HTML documents for scale tests: Zipf vocabulary, class topic words, markup noise."""

import json

import numpy as np

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "shi", "pe", "ga", "do", "li", "ze", "bu", "fa",
              "xo", "qui", "tro", "an", "el", "or", "um", "is", "en"]
_TAGS = ["p", "div", "span", "b", "i", "em", "li", "td", "h2"]
_ENTITIES = ["&amp;", "&nbsp;", "&eacute;", "&#39;", "&quot;", "&lt;3"]


class SynthText:
    """A deterministic generator of labelled HTML documents.

    Args:
        classes: number of classes.
        seed: everything is a function of the seed and the row number.
        vocab: vocabulary size (word rank r has probability ~ 1/r^1.1).
    """

    def __init__(self, classes=4, seed=0, vocab=50_000, topic_words=150):
        rng = np.random.default_rng(seed)
        self.classes, self.seed = classes, seed
        syl = np.array(_SYLLABLES)
        lengths = rng.integers(2, 5, size=vocab)
        self.words = np.array(["".join(syl[rng.integers(0, len(syl), size=k)]) + str(i % 7 or "")
                               for i, k in enumerate(lengths)])
        p = 1.0 / np.arange(1, vocab + 1) ** 1.1
        self.cdf = np.cumsum(p / p.sum())
        self.topics = [rng.choice(np.arange(500, vocab), size=topic_words, replace=False) for _ in range(classes)]
        self.class_names = [f"topic_{c}" for c in range(classes)]

    def block(self, start, count):
        """Rows [start, start + count) as (html_text, label) pairs."""
        rng = np.random.default_rng([self.seed, start])
        labels = rng.integers(0, self.classes, size=count)
        lengths = np.clip(rng.lognormal(4.3, 0.6, size=count).astype(int), 5, 1500)
        words = np.searchsorted(self.cdf, rng.random(int(lengths.sum())))
        topical = rng.random(len(words)) < 0.12
        rows, pos = [], 0
        for i in range(count):
            n = lengths[i]
            idx = words[pos:pos + n].copy()
            t = topical[pos:pos + n]
            topic = self.topics[labels[i]]
            idx[t] = topic[rng.integers(0, len(topic), size=int(t.sum()))]
            pos += n
            rows.append((self._markup(self.words[idx].tolist(), rng), self.class_names[labels[i]]))
        return rows

    def _markup(self, words, rng):
        out = ["<html><head><title>", " ".join(words[:5]), "</title>"]
        if rng.random() < 0.5:
            out.append("<style>.x{color:red} zzstylejunk</style>")
        out.append("</head><body>")
        noise = rng.random(len(words))
        for w, r in zip(words, noise):
            if r < 0.05:
                tag = _TAGS[int(r * 1000) % len(_TAGS)]
                out.append(f'<{tag} class="c{int(r * 100)}">{w}</{tag}>')
            elif r < 0.07:
                out.append(f'<a href="http://example.org/{w}?a=1&amp;b=2" title="x>y">{w}</a>')
            elif r < 0.08:
                out.append(f"{w} {_ENTITIES[int(r * 10000) % len(_ENTITIES)]}")
            elif r < 0.085:
                out.append(f"<!-- zzcommentjunk {w} --> {w}")
            else:
                out.append(w)
        if rng.random() < 0.3:
            out.append("<script>var zzscriptjunk = 1 < 2;</script>")
        out.append("</body></html>")
        return " ".join(out)

    def jsonl_lines(self, n, block=4096):
        """Yield blocks of JSONL lines (bytes), ``{"text": ..., "label": ...}``."""
        for start in range(0, n, block):
            yield [json.dumps({"text": t, "label": y}).encode() for t, y in self.block(start, min(block, n - start))]


def write_jsonl(path, n, classes=4, seed=0):
    """Write ``n`` synthetic documents to ``path`` as JSONL."""
    gen = SynthText(classes=classes, seed=seed)
    with open(path, "wb") as f:
        for lines in gen.jsonl_lines(n):
            f.write(b"\n".join(lines) + b"\n")
