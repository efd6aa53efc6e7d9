"""A multi-task instruction corpus in the Super-NaturalInstructions style, built from Debian text packages.

The R&B paper's main setting is SNI: many tasks, each an instruction with an input and an output, whose
formats differ (define, classify, generate, continue ...) and whose sizes are imbalanced. This builder
makes such a corpus offline from real text shipped by Debian (installed with ``apt-get install -y`` when
missing; needs root or sudo):

    wordnet-base    glosses, usage examples, hypernyms/hyponyms, antonyms, derivations, meronyms,
                    similar-to, entailments, attributes, 45 lexicographer categories
    dict-gcide      the Collaborative International Dictionary of English (1913 Webster): senses with
                    subject labels ``(Zool.)``, parts of speech, etymologies
    dict-foldoc     the Free On-line Dictionary of Computing: entries with ``<category>`` tags
    dict-jargon     the Jargon File
    dict-vera       V.E.R.A. computing acronyms
    bible-kjv-text  the King James Version (read through the package's ``bible`` command)
    fortunes        the fortune files (one category per file)
    manpages        the NAME lines of the manual pages (section = directory)

Every task (see ``TASKS``) is one *original domain*. Each example is rendered as

    Instruction: <the task's instruction>
    Input: <input>
    Output: <output>

and written as the ``text`` column, with ``task`` (the original domain), ``input``, ``output`` and ``id``.
Outputs:

    OUT/train.parquet        seen tasks, training examples (capped per task: sizes are imbalanced on purpose)
    OUT/val.parquet          seen tasks, ≤ VAL_PER_TASK held-out examples each (what a strategy may look at; q)
    OUT/test.parquet         seen tasks, ≤ TEST_PER_TASK other held-out examples each (the in-distribution metric)
    OUT/unseen_val.parquet   held-out WHOLE tasks (``UNSEEN_TASKS``), ≤ VAL_PER_TASK each (for q via `rnb assign`)
    OUT/unseen_test.parquet  held-out whole tasks, ≤ UNSEEN_TEST_PER_TASK each (the unseen-task metric)
    OUT/plain.parquet        the sources' plain text (no templates) — what the benchmark's small model is
                             pretrained on (``text``, ``source``)
    OUT/tokenizer/           a byte-level BPE tokenizer trained on plain.parquet
    OUT/manifest.json        per-task counts, instruction and one example; package versions; seed

Deterministic (seeded shuffles of sorted inputs) and cached: an existing OUT with the same settings is
reused. ``python benchmarks/multitask_corpus.py --output runs/bench/multitask``
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rnb_ray.atomic import atomic_dir

PACKAGES = ["wordnet-base", "dict-gcide", "dict-foldoc", "dict-jargon", "dict-vera", "bible-kjv-text",
            "fortunes", "manpages"]
WORDNET = Path("/usr/share/wordnet")
DICTD = Path("/usr/share/dictd")
FORTUNES = Path("/usr/share/games/fortunes")
MAN = Path("/usr/share/man")
BUILD_VERSION = 3  # bump when the task definitions change (the cache key includes it)

VAL_PER_TASK = 16
TEST_PER_TASK = 32
UNSEEN_TEST_PER_TASK = 64
MAX_IN, MAX_OUT = 320, 200  # characters kept of an input / an output


class CorpusError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------- packages
def ensure_installed(packages: list[str] = PACKAGES) -> None:
    missing = [p for p in packages if subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True,
                                                     text=True).stdout.strip() != "install ok installed"]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise CorpusError(f"packages {missing} are missing and apt-get is not available (Debian/Ubuntu needed)")
    cmd = ["apt-get", "install", "-y", "-q", *missing]
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise CorpusError(f"run `sudo apt-get install -y {' '.join(missing)}` and retry")
        cmd = ["sudo", "-n", *cmd]
    print("installing:", " ".join(cmd), file=sys.stderr)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        subprocess.run([*cmd[: cmd.index("install")], "update", "-q"], capture_output=True, text=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise CorpusError(f"apt-get install {' '.join(missing)} failed: {done.stderr.strip()[-500:]}")


def package_versions(packages: list[str] = PACKAGES) -> dict[str, str]:
    out = {}
    for p in packages:
        v = subprocess.run(["dpkg-query", "-W", "-f=${Version}", p], capture_output=True, text=True).stdout.strip()
        out[p] = v or None
    return out


def _clean(s: str, limit: int) -> str:
    s = " ".join(s.split())
    return s if len(s) <= limit else s[: limit - 1].rsplit(" ", 1)[0] + " …"


# ----------------------------------------------------------------------------------- WordNet
LEXNAMES = ["adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
            "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
            "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
            "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
            "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change",
            "verb.cognition", "verb.communication", "verb.competition", "verb.consumption", "verb.contact",
            "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession",
            "verb.social", "verb.stative", "verb.weather", "adj.ppl"]


@dataclass
class Synset:
    key: tuple[str, int]
    lexname: str
    pos: str  # n v a r (s folded into a)
    words: list[str]
    ptrs: list[tuple[str, tuple[str, int], int, int]]  # (symbol, target key, source word no, target word no)
    definition: str
    examples: list[str]


def _wn_word(w: str) -> str:
    return re.sub(r"\([a-z]+\)$", "", w).replace("_", " ")


def read_wordnet(root: Path = WORDNET) -> dict[tuple[str, int], Synset]:
    syn: dict[tuple[str, int], Synset] = {}
    for name, pos in (("noun", "n"), ("verb", "v"), ("adj", "a"), ("adv", "r")):
        for line in (root / f"data.{name}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  "):
                continue
            head, _, gloss = line.partition(" | ")
            f = head.split()
            off, lex, n = int(f[0]), int(f[1]), int(f[3], 16)
            words = [_wn_word(f[4 + 2 * i]) for i in range(n)]
            i = 4 + 2 * n
            pcnt = int(f[i])
            ptrs = []
            for j in range(pcnt):
                sym, toff, tpos, st = f[i + 1 + 4 * j: i + 5 + 4 * j]
                tpos = "a" if tpos == "s" else tpos
                ptrs.append((sym, (tpos, int(toff)), int(st[:2], 16), int(st[2:], 16)))
            parts = [p.strip() for p in gloss.strip().split(";")]
            definition = parts[0]
            examples = [p.strip('"').strip() for p in parts[1:] if p.startswith('"')]
            syn[(pos, off)] = Synset((pos, off), LEXNAMES[lex] if lex < len(LEXNAMES) else str(lex), pos, words,
                                     ptrs, definition, examples)
    return syn


POS_NAME = {"n": "noun", "v": "verb", "a": "adjective", "r": "adverb"}


def wordnet_tasks(syn: dict[tuple[str, int], Synset]) -> dict[str, list[tuple[str, str]]]:
    t: dict[str, list[tuple[str, str]]] = {k: [] for k in (
        "wn_define_noun", "wn_define_verb", "wn_define_adj", "wn_define_adv", "wn_word_from_definition",
        "wn_hypernym", "wn_hyponym", "wn_antonym", "wn_derivation", "wn_fill_blank", "wn_part_meronym",
        "wn_member_meronym", "wn_lexname", "wn_synonyms", "wn_similar", "wn_entailment", "wn_attribute",
        "wn_pos")}
    for key in sorted(syn):
        s = syn[key]
        w0 = s.words[0]
        d = s.definition
        if len(d) < 8:
            continue
        t[{"n": "wn_define_noun", "v": "wn_define_verb", "a": "wn_define_adj", "r": "wn_define_adv"}[s.pos]].append((w0, d))
        if s.pos == "n":
            t["wn_word_from_definition"].append((d, w0))
        t["wn_lexname"].append((f"{w0}: {d}", s.lexname))
        t["wn_pos"].append((d, POS_NAME[s.pos]))
        if len(s.words) >= 2:
            t["wn_synonyms"].append((w0, ", ".join(s.words[1:4])))
        for ex in s.examples:
            for w in s.words:
                m = re.search(rf"\b{re.escape(w)}\b", ex, flags=re.I)
                if m and len(ex) > len(w) + 10:
                    t["wn_fill_blank"].append((ex[: m.start()] + "____" + ex[m.end():], w))
                    break
            else:
                continue
            break
        for sym, tkey, src, dst in s.ptrs:
            other = syn.get(tkey)
            if other is None:
                continue
            sw = s.words[src - 1] if src else w0
            ow = other.words[dst - 1] if dst else other.words[0]
            if sym in ("@", "@i") and s.pos == "n":
                t["wn_hypernym"].append((w0, ow))
            elif sym in ("~", "~i") and s.pos == "n":
                t["wn_hyponym"].append((w0, ow))
            elif sym == "!" and s.pos in ("a", "r", "v"):
                t["wn_antonym"].append((sw, ow))
            elif sym == "+" and s.pos in ("n", "v"):
                t["wn_derivation"].append((f"{sw} ({POS_NAME[s.pos]})", f"{ow} ({POS_NAME[other.pos]})"))
            elif sym == "%p":
                t["wn_part_meronym"].append((w0, ow))
            elif sym == "%m":
                t["wn_member_meronym"].append((w0, ow))
            elif sym == "&":
                t["wn_similar"].append((w0, ow))
            elif sym == "*":
                t["wn_entailment"].append((w0, ow))
            elif sym == "=" and s.pos == "a":
                t["wn_attribute"].append((w0, ow))
    for name in ("wn_hypernym", "wn_hyponym", "wn_part_meronym", "wn_member_meronym", "wn_similar"):
        t[name] = _first_per_input(t[name])  # one answer per input word keeps the tasks answerable
    return t


def _first_per_input(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen, out = set(), []
    for a, b in pairs:
        if a not in seen:
            seen.add(a)
            out.append((a, b))
    return out


# ----------------------------------------------------------------------------------- dictd (GCIDE, FOLDOC, Jargon, VERA)
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64.index(c)
    return n


def read_dictd(name: str, root: Path = DICTD) -> list[tuple[str, str]]:
    """[(headword, entry text)] in index order (dictd's index: word, base-64 offset, base-64 length)."""
    data = gzip.decompress((root / f"{name}.dict.dz").read_bytes())
    out, seen = [], set()
    for line in (root / f"{name}.index").read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
            continue
        off, ln = _b64(parts[1]), _b64(parts[2])
        if (off, ln) in seen:
            continue
        seen.add((off, ln))
        out.append((parts[0], data[off: off + ln].decode("utf-8", errors="replace")))
    return out


GCIDE_SUBJECTS = {"Zool.": "zoology", "Bot.": "botany", "Anat.": "anatomy", "Med.": "medicine", "Law": "law",
                  "Chem.": "chemistry", "Naut.": "nautical", "Mus.": "music", "Arch.": "architecture",
                  "Geom.": "geometry", "Math.": "mathematics", "Mech.": "mechanics", "Mil.": "military",
                  "Astron.": "astronomy", "Geol.": "geology", "Min.": "mineralogy", "Gram.": "grammar",
                  "Her.": "heraldry", "Eccl.": "ecclesiastical", "Physiol.": "physiology", "Elec.": "electricity",
                  "Zoöl.": "zoology", "Com.": "commerce", "Logic": "logic", "Theol.": "theology",
                  "Paleon.": "paleontology", "Print.": "printing", "Rhet.": "rhetoric", "Pros.": "prosody",
                  "Myth.": "mythology", "Physics": "physics", "Surg.": "surgery", "Agric.": "agriculture",
                  "Arch": "architecture", "Falconry": "falconry", "Far.": "farriery", "Music": "music",
                  "Pharm.": "pharmacy", "Biol.": "biology", "Opt.": "optics", "Metal.": "metallurgy"}
GCIDE_POS = {"n.": "noun", "v. t.": "transitive verb", "v. i.": "intransitive verb", "a.": "adjective",
             "adv.": "adverb", "p. p.": "past participle", "p. pr. & vb. n.": "present participle",
             "imp.": "past tense", "prep.": "preposition", "interj.": "interjection", "pl.": "plural", "pron.": "pronoun"}
GCIDE_ORIGIN = {"L.": "Latin", "F.": "French", "Gr.": "Greek", "AS.": "Anglo-Saxon", "It.": "Italian",
                "Sp.": "Spanish", "G.": "German", "D.": "Dutch", "Ar.": "Arabic", "Heb.": "Hebrew",
                "Skr.": "Sanskrit", "Icel.": "Icelandic", "OF.": "Old French", "LL.": "Late Latin",
                "Pg.": "Portuguese", "Per.": "Persian", "NL.": "New Latin", "W.": "Welsh", "Russ.": "Russian"}
_GC_HEAD = re.compile(r"^(?P<word>[^\\\n]+?)\s*\\(?P<pron>[^\\]*)\\,\s*(?P<pos>[a-z][a-z. &]*?\.)\s*(?:\[(?P<etym>[^\]]*)\])?")
_GC_SENSE = re.compile(r"^\s*(?:\d+\.\s*)?\((?P<label>[A-Z][A-Za-zö]+\.?)\)\s*(?P<text>.+)$", re.S)


def gcide_tasks(entries: list[tuple[str, str]]) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    t: dict[str, list[tuple[str, str]]] = {"gcide_define": [], "gcide_subject": [], "gcide_pos": [], "gcide_origin": []}
    plain = []
    for _head, body in entries:
        body = re.sub(r"\[[^\]]*Webster[^\]]*\]|\[PJC\]|\[Century Dict\.\]", "", body.replace("\r", ""))
        blocks = [b for b in re.split(r"\n\s*\n", body) if b.strip()]
        if not blocks:
            continue
        m = _GC_HEAD.match(blocks[0].strip())
        if not m:
            continue
        word = m.group("word").strip()
        b0 = blocks[0].strip()
        line0 = b0.split("\n", 1)[0]
        cut = b0.find("]", line0.find("[")) + 1 if "[" in line0 else len(line0)
        first = b0[cut:] if len(b0) - cut >= 5 else (blocks[1] if len(blocks) > 1 else "")
        senses = [b.strip() for b in blocks]
        plain.append(" ".join(" ".join(s.split()) for s in senses))
        pos = m.group("pos").strip()
        if pos in GCIDE_POS:
            t["gcide_pos"].append((f"{word} \\{m.group('pron')}\\", GCIDE_POS[pos]))
        etym = (m.group("etym") or "").strip()
        lang = etym.split(" ")[0] if etym else ""
        if etym.startswith(("Cf.", "See")):
            lang = ""
        if lang in GCIDE_ORIGIN:
            t["gcide_origin"].append((word, GCIDE_ORIGIN[lang]))
        labelled = False
        for s in senses[1:] if len(senses) > 1 else [first]:
            sm = _GC_SENSE.match(s)
            if sm and sm.group("label") in GCIDE_SUBJECTS and not labelled:
                text = re.sub(r"\s*--[A-Z][\w.]*\.?$", "", sm.group("text")).strip()
                if len(text) > 20:
                    t["gcide_subject"].append((_clean(text, MAX_IN), GCIDE_SUBJECTS[sm.group("label")]))
                    labelled = True
        d = re.sub(r"^\s*(?:\d+\.\s*)?(?:\([^)]*\)\s*)?", "", first).strip()
        d = re.sub(r"\s*--[A-Z][\w.]*\.?$", "", d)
        if len(d) > 15 and d[0].isalpha() and not d.startswith(("See", "Same as", "Obs.")):
            t["gcide_define"].append((word, _clean(d, MAX_OUT)))
    t["gcide_define"] = _first_per_input(t["gcide_define"])
    t["gcide_origin"] = _first_per_input(t["gcide_origin"])
    t["gcide_pos"] = _first_per_input(t["gcide_pos"])
    return t, plain


def foldoc_tasks(entries: list[tuple[str, str]]) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    t: dict[str, list[tuple[str, str]]] = {"foldoc_category": [], "foldoc_define": []}
    plain = []
    counts: dict[str, int] = {}
    parsed = []
    for _head, body in entries:
        lines = body.split("\n", 1)
        if len(lines) < 2:
            continue
        term, text = lines[0].strip(), " ".join(lines[1].split())
        text = re.sub(r"\(\d{4}-\d{2}-\d{2}\)\s*$", "", text).strip()
        if not text:
            continue
        tags = re.findall(r"<([a-z][a-z ]*)>", text)
        stripped = re.sub(r"\s*<[a-z][a-z ,]*>\s*", " ", text).replace("{", "").replace("}", "").strip()
        plain.append(f"{term}: {stripped}")
        parsed.append((term, stripped, tags))
        if len(tags) == 1:
            counts[tags[0]] = counts.get(tags[0], 0) + 1
    common = {c for c, n in counts.items() if n >= 40}
    for term, stripped, tags in parsed:
        if len(stripped) < 20 or stripped.lower().startswith("see"):
            continue
        if len(tags) == 1 and tags[0] in common:
            t["foldoc_category"].append((_clean(f"{term}: {stripped}", MAX_IN), tags[0]))
        t["foldoc_define"].append((term, _clean(re.split(r"(?<=[.!?])\s", stripped, maxsplit=1)[0], MAX_OUT)))
    return t, plain


def jargon_tasks(entries: list[tuple[str, str]]) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    t: dict[str, list[tuple[str, str]]] = {"jargon_define": [], "jargon_term": []}
    plain = []
    for _head, body in entries:
        parts = body.split("\n\n", 1)
        if len(parts) < 2:
            continue
        term = parts[0].split("\n")[0].strip()
        text = " ".join(parts[1].split()).replace("{", "").replace("}", "")
        text = re.sub(r"^\[[^\]]*\]\s*", "", text)
        if len(text) < 20 or text.lower().startswith("see"):
            continue
        plain.append(f"{term}: {text}")
        first = _clean(re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0], MAX_OUT)
        t["jargon_define"].append((term, first))
        masked = re.sub(re.escape(term), "____", first, flags=re.I)
        t["jargon_term"].append((masked, term))
    return t, plain


def vera_tasks(entries: list[tuple[str, str]]) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    t: dict[str, list[tuple[str, str]]] = {"vera_expand": [], "vera_abbreviate": []}
    plain = []
    for _head, body in entries:
        lines = [x.strip() for x in body.strip().split("\n") if x.strip()]
        if len(lines) < 2:
            continue
        acr, exp = lines[0], " ".join(lines[1:])
        exp_plain = re.sub(r"\s*[\[(][^\])]*[\])]", "", exp).strip()
        if not exp_plain or len(acr) > 12:
            continue
        plain.append(f"{acr}: {exp}")
        t["vera_expand"].append((acr, exp_plain))
        t["vera_abbreviate"].append((exp_plain, acr))
    return t, plain


# ----------------------------------------------------------------------------------- KJV
OLD_TESTAMENT_BOOKS = 39


def read_kjv() -> list[tuple[str, int, int, str]]:
    """[(book, chapter, verse, text)] in canonical order, from the package's ``bible`` command."""
    exe = shutil.which("bible")
    if exe is None:
        raise CorpusError("the `bible` command (package bible-kjv) is missing; apt-get install -y bible-kjv-text")
    out = subprocess.run([exe, "-l10000", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    verses, book, chap = [], None, 0
    for line in out.splitlines():
        if not line.strip():
            continue
        if line.startswith("  "):
            m = re.match(r"\s+(\d+)\s+(.*)", line)
            if m and book:
                verses.append((book, chap, int(m.group(1)), m.group(2).strip()))
        else:
            book, _, c = line.strip().rpartition(" ")
            chap = int(c)
    return verses


def kjv_tasks(verses: list[tuple[str, int, int, str]]) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    t: dict[str, list[tuple[str, str]]] = {"kjv_book": [], "kjv_continue": [], "kjv_testament": [], "kjv_reference": []}
    books: list[str] = []
    for b, *_ in verses:
        if not books or books[-1] != b:
            books.append(b)
    testament = {b: ("Old Testament" if i < OLD_TESTAMENT_BOOKS else "New Testament") for i, b in enumerate(books)}
    plain, chapter = [], []
    for i, (b, c, v, text) in enumerate(verses):
        t["kjv_book"].append((_clean(text, MAX_IN), b))
        t["kjv_testament"].append((_clean(text, MAX_IN), testament[b]))
        t["kjv_reference"].append((f"{b} {c}:{v}", _clean(text, MAX_OUT)))
        if i + 1 < len(verses) and verses[i + 1][:2] == (b, c):
            t["kjv_continue"].append((_clean(text, MAX_IN), _clean(verses[i + 1][3], MAX_OUT)))
        chapter.append(text)
        if i + 1 == len(verses) or verses[i + 1][:2] != (b, c) or len(chapter) == 8:
            plain.append(" ".join(chapter))
            chapter = []
    return t, plain


# ----------------------------------------------------------------------------------- fortunes, man pages
def fortune_tasks() -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fortunes  # benchmarks/fortunes.py: the same parser as the fortunes benchmark

    cats = fortunes.load_categories(FORTUNES)
    t: dict[str, list[tuple[str, str]]] = {"fortune_file": [], "fortune_attribution": [], "fortune_continue": []}
    plain = []
    for name in sorted(cats):
        for e in cats[name]:
            plain.append(e)
            flat = " ".join(e.split())
            m = re.match(r"(.{20,}?)\s+-{1,2}\s*([A-Z][\w.' ]{2,40}?)(?:,.*)?$", flat)
            if m:
                t["fortune_attribution"].append((_clean(m.group(1), MAX_IN), m.group(2).strip()))
            if len(cats[name]) >= 50 and len(flat) <= MAX_IN:
                t["fortune_file"].append((flat, name))
            words = flat.split()
            if 12 <= len(words) <= 80:
                half = len(words) // 2
                t["fortune_continue"].append((" ".join(words[:half]), _clean(" ".join(words[half:]), MAX_OUT)))
    return t, plain


def man_tasks(root: Path = MAN) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    t: dict[str, list[tuple[str, str]]] = {"man_section": [], "man_describe": [], "man_name": []}
    plain, seen = [], set()
    for sec_dir in sorted(root.glob("man[1-8]")):
        sec = sec_dir.name[3:]
        for f in sorted(sec_dir.iterdir()):
            if f.is_symlink() or not f.name.endswith(".gz"):
                continue
            try:
                text = gzip.decompress(f.read_bytes()).decode("utf-8", errors="replace")
            except (OSError, EOFError):
                continue
            m = re.search(r"^\.S[Hh]\s+\"?NAME\"?\s*\n(.*?)(?=^\.S[Hh]|\Z)", text, flags=re.M | re.S)
            if not m:
                continue
            body = re.sub(r"^\.[A-Za-z]+\s*", "", m.group(1), flags=re.M)
            body = re.sub(r"\\f[BIRP]|\\\(em|\\&|\\\(en", "", body).replace("\\-", "-").replace("\\", "")
            body = " ".join(body.split())
            nm = re.match(r"(.+?)\s+-+\s+(.+)", body)
            if not nm:
                continue
            names, desc = nm.group(1).strip(), nm.group(2).strip()
            name = names.split(",")[0].strip()
            if not name or (name, sec) in seen or len(desc) < 5:
                continue
            seen.add((name, sec))
            plain.append(f"{names} ({sec}) - {desc}")
            t["man_section"].append((f"{name} - {_clean(desc, MAX_IN)}", sec))
            t["man_describe"].append((f"{name}({sec})", _clean(desc, MAX_OUT)))
            t["man_name"].append((f"section {sec}: {_clean(desc, MAX_IN)}", name))
    return t, plain


# ----------------------------------------------------------------------------------- the task table
@dataclass(frozen=True)
class Task:
    name: str
    source: str
    instruction: str
    cap: int  # most training examples kept (sizes imbalanced like SNI's)


TASKS: list[Task] = [
    Task("wn_define_noun", "WordNet", "Give the dictionary definition of the noun.", 1200),
    Task("wn_define_verb", "WordNet", "Define the verb.", 700),
    Task("wn_define_adj", "WordNet", "Write a short definition of the adjective.", 500),
    Task("wn_word_from_definition", "WordNet", "Name the noun that this definition describes.", 900),
    Task("wn_hypernym", "WordNet", "Give a more general term (a hypernym) for the word.", 800),
    Task("wn_antonym", "WordNet", "Give a word that means the opposite.", 300),
    Task("wn_derivation", "WordNet", "Give a word derived from the same root, with its part of speech.", 500),
    Task("wn_fill_blank", "WordNet", "Fill in the blank in the sentence with the missing word.", 600),
    Task("wn_part_meronym", "WordNet", "Name one part of the thing.", 250),
    Task("wn_member_meronym", "WordNet", "Name one member of the group.", 150),
    Task("wn_lexname", "WordNet", "Classify the word sense into its WordNet lexicographer category.", 1000),
    Task("wn_synonyms", "WordNet", "List synonyms of the word.", 400),
    Task("wn_similar", "WordNet", "Give an adjective with a similar meaning.", 200),
    Task("wn_attribute", "WordNet", "Name the attribute (a noun) that the adjective describes a value of.", 80),
    Task("wn_pos", "WordNet", "Is this gloss the definition of a noun, a verb, an adjective or an adverb?", 400),
    Task("gcide_define", "GCIDE", "Define the word as Webster's 1913 dictionary does.", 1200),
    Task("gcide_subject", "GCIDE", "Which field of knowledge does this dictionary sense belong to?", 800),
    Task("gcide_pos", "GCIDE", "Give the part of speech of the headword from its pronunciation entry.", 300),
    Task("foldoc_category", "FOLDOC", "Name the computing category of this dictionary entry.", 700),
    Task("foldoc_define", "FOLDOC", "Explain the computing term in one sentence.", 500),
    Task("jargon_define", "Jargon File", "Explain this piece of hacker jargon.", 400),
    Task("vera_expand", "V.E.R.A.", "Expand the computing acronym.", 1000),
    Task("kjv_book", "KJV", "Which book of the Bible is this verse from?", 900),
    Task("kjv_continue", "KJV", "Continue the passage with the next verse.", 600),
    Task("kjv_reference", "KJV", "Quote the verse of the King James Bible at this reference.", 150),
    Task("fortune_file", "fortunes", "Which fortune file does this quotation come from?", 700),
    Task("fortune_attribution", "fortunes", "Who said this?", 200),
    Task("man_section", "man pages", "In which section of the Unix manual is this page?", 400),
    Task("man_describe", "man pages", "Give the one-line description of the manual page.", 300),
    # held out whole (the unseen-task evaluation, like SNI's test tasks); cap = most unseen_test examples
    Task("wn_hyponym", "WordNet", "Give a more specific kind of the thing (a hyponym).", 0),
    Task("wn_define_adv", "WordNet", "What does this adverb mean?", 0),
    Task("wn_entailment", "WordNet", "Name an action that doing this necessarily involves.", 0),
    Task("gcide_origin", "GCIDE", "From which language does this English word come?", 0),
    Task("jargon_term", "Jargon File", "Which jargon term is defined here? The term is blanked out.", 0),
    Task("vera_abbreviate", "V.E.R.A.", "Give the acronym of this computing phrase.", 0),
    Task("kjv_testament", "KJV", "Is this verse from the Old Testament or the New Testament?", 0),
    Task("fortune_continue", "fortunes", "Finish the quotation.", 0),
    Task("man_name", "man pages", "Name the command or function that this manual page describes.", 0),
]
UNSEEN_TASKS = [t.name for t in TASKS if t.cap == 0]


def render(task: Task, inp: str, out: str) -> str:
    return f"Instruction: {task.instruction}\nInput: {inp}\nOutput: {out}"


def collect() -> tuple[dict[str, list[tuple[str, str]]], dict[str, list[str]]]:
    """{task: [(input, output)]} and {source: [plain text]} from every package."""
    raw: dict[str, list[tuple[str, str]]] = {}
    plain: dict[str, list[str]] = {}
    syn = read_wordnet()
    raw |= wordnet_tasks(syn)
    plain["WordNet"] = [f"{', '.join(s.words)}: {s.definition}" + "".join(f'; "{e}"' for e in s.examples)
                        for _, s in sorted(syn.items())]
    builders: list[tuple[str, Callable[[], tuple[dict, list[str]]]]] = [
        ("GCIDE", lambda: gcide_tasks(read_dictd("gcide"))),
        ("FOLDOC", lambda: foldoc_tasks(read_dictd("foldoc"))),
        ("Jargon File", lambda: jargon_tasks(read_dictd("jargon"))),
        ("V.E.R.A.", lambda: vera_tasks(read_dictd("vera"))),
        ("KJV", lambda: kjv_tasks(read_kjv())),
        ("fortunes", fortune_tasks),
        ("man pages", man_tasks),
    ]
    for src, fn in builders:
        t, p = fn()
        raw |= t
        plain[src] = p
    return raw, plain


def _dedup(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen, out = set(), []
    for a, b in pairs:
        a, b = _clean(a, MAX_IN), _clean(b, MAX_OUT)
        if a and b and (a, b) not in seen:
            seen.add((a, b))
            out.append((a, b))
    return out


def split_tasks(raw: dict[str, list[tuple[str, str]]], seed: int) -> dict[str, list[dict]]:
    parts: dict[str, list[dict]] = {k: [] for k in ("train", "val", "test", "unseen_val", "unseen_test")}
    for task in TASKS:
        pairs = _dedup(raw.get(task.name, []))
        if len(pairs) < 60:
            raise CorpusError(f"task {task.name} has only {len(pairs)} examples; the source package may have changed")
        rng = random.Random(f"{seed}:{task.name}")
        rng.shuffle(pairs)

        def rows(sel: list[tuple[str, str]], start: int, task: Task = task) -> Iterator[dict]:
            for j, (a, b) in enumerate(sel):
                yield {"id": f"{task.name}:{start + j}", "task": task.name, "input": a, "output": b,
                       "text": render(task, a, b)}

        if task.cap == 0:
            parts["unseen_val"] += rows(pairs[:VAL_PER_TASK], 0)
            parts["unseen_test"] += rows(pairs[VAL_PER_TASK: VAL_PER_TASK + UNSEEN_TEST_PER_TASK], VAL_PER_TASK)
            continue
        n_val = VAL_PER_TASK
        n_test = min(TEST_PER_TASK, max(8, len(pairs) // 5))
        parts["val"] += rows(pairs[:n_val], 0)
        parts["test"] += rows(pairs[n_val: n_val + n_test], n_val)
        parts["train"] += rows(pairs[n_val + n_test: n_val + n_test + task.cap], n_val + n_test)
    return parts


def _table(rows: list[dict]) -> pa.Table:
    cols = list(rows[0])
    return pa.table({c: pa.array([r[c] for r in rows], pa.string()) for c in cols})


def settings_key(seed: int, vocab_size: int, plain_per_source: int) -> dict:
    return {"build_version": BUILD_VERSION, "seed": seed, "vocab_size": vocab_size,
            "plain_per_source": plain_per_source, "val_per_task": VAL_PER_TASK, "test_per_task": TEST_PER_TASK,
            "unseen_test_per_task": UNSEEN_TEST_PER_TASK, "tasks": [t.__dict__ for t in TASKS]}


def build(output: Path, *, seed: int = 0, vocab_size: int = 4096, plain_per_source: int = 6000,
          install: bool = True) -> dict:
    """Write the corpus (see the module docstring) atomically; reuse OUT when its settings match."""
    key = settings_key(seed, vocab_size, plain_per_source)
    mf = output / "manifest.json"
    if mf.is_file():
        old = json.loads(mf.read_text())
        if old.get("settings") == key:
            return old
    if install:
        ensure_installed()
    raw, plain = collect()
    parts = split_tasks(raw, seed)
    plain_rows = []
    for src in sorted(plain):
        texts = sorted(set(p for p in plain[src] if p.strip()))
        random.Random(f"{seed}:plain:{src}").shuffle(texts)
        plain_rows += [{"text": x, "source": src} for x in texts[:plain_per_source]]
    counts = {t.name: {"source": t.source, "instruction": t.instruction, "unseen": t.cap == 0,
                       "available": len(_dedup(raw.get(t.name, []))),
                       **{p: sum(1 for r in parts[p] if r["task"] == t.name) for p in parts}} for t in TASKS}
    examples = {}
    for p in ("train", "unseen_test"):
        for r in parts[p]:
            examples.setdefault(r["task"], {"input": r["input"], "output": r["output"]})
    manifest = {"settings": key, "packages": package_versions(), "n_tasks": len(TASKS),
                "n_seen_tasks": len(TASKS) - len(UNSEEN_TASKS), "unseen_tasks": UNSEEN_TASKS,
                **{f"n_{p}": len(v) for p, v in parts.items()}, "n_plain": len(plain_rows),
                "plain_by_source": {s: sum(1 for r in plain_rows if r["source"] == s) for s in sorted(plain)},
                "tasks": counts, "examples": examples}
    with atomic_dir(output) as tmp:
        for p, rows in parts.items():
            pq.write_table(_table(rows), tmp / f"{p}.parquet")
        pq.write_table(_table(plain_rows), tmp / "plain.parquet")
        if vocab_size:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            import fortunes

            fortunes.train_tokenizer([r["text"] for r in plain_rows], tmp / "tokenizer", vocab_size)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    return manifest


def readme_table(manifest: dict) -> str:
    """Markdown: every task, its source, sizes and one example."""
    lines = ["| task | source | train | held-out (val/test) | instruction | example input → output |",
             "|---|---|---|---|---|---|"]

    def esc(s: str, n: int = 70) -> str:
        s = _clean(s, n)
        return s.replace("|", "\\|").replace("\n", " ")

    for name, c in manifest["tasks"].items():
        ex = manifest["examples"].get(name, {})
        tr = "*unseen*" if c["unseen"] else str(c["train"])
        ho = f"{c['unseen_val']}/{c['unseen_test']}" if c["unseen"] else f"{c['val']}/{c['test']}"
        lines.append(f"| `{name}` | {c['source']} | {tr} | {ho} | {esc(c['instruction'], 80)} | "
                     f"{esc(ex.get('input', ''), 60)} → {esc(ex.get('output', ''), 50)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--plain-per-source", type=int, default=6000)
    ap.add_argument("--table", action="store_true", help="print the README table of tasks")
    args = ap.parse_args(argv)
    try:
        m = build(args.output, seed=args.seed, vocab_size=args.vocab_size, plain_per_source=args.plain_per_source)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{m['n_tasks']} tasks ({m['n_seen_tasks']} seen, {len(m['unseen_tasks'])} unseen): {m['n_train']} train, "
          f"{m['n_val']} val, {m['n_test']} test, {m['n_unseen_val']} unseen val, {m['n_unseen_test']} unseen test, "
          f"{m['n_plain']} plain texts -> {args.output}")
    if args.table:
        print(readme_table(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
