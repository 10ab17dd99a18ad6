"""Text normalisation for prompt resolution (pure Python, no third-party imports).

Two levels are used by :class:`~unisegtext.knowledge.tree.KnowledgeTree`:

* :func:`normalize` (level 1, "strict"): case, accents, punctuation, British -> US spelling,
  plural -> singular, ordinal and Roman numerals, clinical shorthand ("rt", "ant", "seg"),
  vertebra labels ("L-1" -> "l1") and laterality in any of its written forms ("R kidney",
  "rt. kidney", "kidney, left", "left-sided kidney"), which is moved to a ``|left`` /
  ``|right`` suffix so that word order around it no longer matters.
* :func:`token_key` (level 2, "loose"): the level-1 form as a sorted bag of words, without
  filler words ("the", "of", "structure", "gland", "bone", "muscle") and with organ adjectives
  mapped to their noun ("renal" -> "kidney", "hepatic" -> "liver"). Keys that two concepts
  share are ambiguous and are not used for resolution.

The same functions normalise the tree's names and synonyms (at load time and in the
validator) and the user's text, so both sides always agree.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

__all__ = ["normalize", "token_key", "split_laterality", "LATERALITY_WORDS"]

# ---------------------------------------------------------------------------------------------
# word lists

#: whole-word British -> US spellings (regular patterns are handled by _SPELLING_PATTERNS)
_UK_US_WORDS: dict[str, str] = {
    "tumour": "tumor",
    "tumours": "tumors",
    "tumoural": "tumoral",
    "colour": "color",
    "centre": "center",
    "centres": "centers",
    "fibre": "fiber",
    "fibres": "fibers",
    "sulphur": "sulfur",
    "labour": "labor",
    "behaviour": "behavior",
    "grey": "gray",
    "anaesthesia": "anesthesia",
    "oesophagus": "esophagus",
    "aluminium": "aluminum",
    "hypophysial": "hypophyseal",
}

#: regular British spelling patterns applied to each word: (regex, replacement)
_SPELLING_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^haem"), "hem"),  # haemorrhage, haematoma, haemangioma
    (re.compile(r"^oesophag"), "esophag"),
    (re.compile(r"^oedem"), "edem"),
    (re.compile(r"^caec"), "cec"),  # caecum, caecal
    (re.compile(r"^foet"), "fet"),
    (re.compile(r"^paed"), "ped"),
    (re.compile(r"^orthopaed"), "orthoped"),
    (re.compile(r"^gynaec"), "gynec"),
    (re.compile(r"^leuc"), "leuk"),
    (re.compile(r"aemi(a|c)$"), r"emi\1"),  # ischaemia, anaemic
    (re.compile(r"^ischaem"), "ischem"),
    (re.compile(r"^oestr"), "estr"),
    (re.compile(r"^diarrhoe"), "diarrhe"),
    (re.compile(r"^haemat"), "hemat"),
    (re.compile(r"tumour"), "tumor"),  # peritumoural, intratumoural
    (re.compile(r"oedem"), "edem"),  # lymphoedema
    (re.compile(r"haem"), "hem"),  # intracerebral haemorrhage, subarachnoid haematoma
]

#: irregular and Latin/Greek plurals -> singular
_PLURALS: dict[str, str] = {
    "vertebrae": "vertebra",
    "costae": "costa",
    "fossae": "fossa",
    "bursae": "bursa",
    "tibiae": "tibia",
    "fibulae": "fibula",
    "ulnae": "ulna",
    "scapulae": "scapula",
    "claviculae": "clavicula",
    "patellae": "patella",
    "conchae": "concha",
    "laminae": "lamina",
    "tonsillae": "tonsilla",
    "venae": "vena",
    "cavae": "cava",
    "bronchi": "bronchus",
    "nuclei": "nucleus",
    "sulci": "sulcus",
    "gyri": "gyrus",
    "menisci": "meniscus",
    "fasciculi": "fasciculus",
    "thalami": "thalamus",
    "hippocampi": "hippocampus",
    "calculi": "calculus",
    "foramina": "foramen",
    "ganglia": "ganglion",
    "phalanges": "phalanx",
    "cortices": "cortex",
    "apices": "apex",
    "testes": "testis",
    "pelves": "pelvis",
    "ovaries": "ovary",
    "meninges": "meninx",
    "lumina": "lumen",
    "corpora": "corpus",
    "viscera": "viscus",
    "femora": "femur",
    "humeri": "humerus",
    "radii": "radius",
    "glutei": "gluteus",
    "ureteres": "ureter",
    "teeth": "tooth",
    "feet": "foot",
    "leaves": "leaf",
    "halves": "half",
    "valves": "valve",
    "nerves": "nerve",
    "curves": "curve",
    "metastases": "metastasis",
    "diagnoses": "diagnosis",
    "processes": "process",
    "sinuses": "sinus",
    "plexuses": "plexus",
    "bronchioles": "bronchiole",
    "axes": "axis",
    "cysts": "cyst",
}

#: words that must never lose a final "s" (singular words ending in s)
_KEEP_S = {
    "pons", "lens", "biceps", "triceps", "quadriceps", "pubis", "os", "ramus", "is", "this",
    "its", "us", "thus", "gas", "series", "species", "bias", "canvas", "atlas", "pancreas",
    "iris", "vas", "pes", "abdominis", "thoracis", "colli", "capitis", "cervicis", "plus",
    "trabs", "mons", "axis", "apparatus", "ductus", "meatus", "sinus", "plexus", "corpus",
    "hiatus", "uterus", "thalamus", "fundus", "hallucis", "pollicis", "lumborum", "ileus",
    "anus", "fornix", "crus", "venosus", "arteriosus", "chiasmus", "torus",
}

#: clinical shorthand expanded word by word (only unambiguous ones; concept-specific
#: abbreviations such as "IVC" or "RUL" are synonyms in the tree)
_SHORTHAND: dict[str, str] = {
    "rt": "right",
    "lt": "left",
    "lft": "left",
    "rgt": "right",
    "ant": "anterior",
    "post": "posterior",
    "sup": "superior",
    "inf": "inferior",
    "lat": "lateral",
    "med": "medial",
    "int": "internal",
    "ext": "external",
    "prox": "proximal",
    "dist": "distal",
    "seg": "segment",
    "segm": "segment",
    "lig": "ligament",
    "vert": "vertebra",
    "gl": "gland",
    "art": "artery",
    "sx": "segment",
    "bilat": "bilateral",
    "mets": "metastasis",
    "met": "metastasis",
    "pz": "peripheral zone",
    "tz": "transition zone",
    "&": "and",
    "w": "with",
}

_ORDINALS: dict[str, str] = {
    "first": "1", "second": "2", "third": "3", "fourth": "4", "fifth": "5", "sixth": "6",
    "seventh": "7", "eighth": "8", "ninth": "9", "tenth": "10", "eleventh": "11", "twelfth": "12",
    "1st": "1", "2nd": "2", "3rd": "3", "4th": "4", "5th": "5", "6th": "6", "7th": "7",
    "8th": "8", "9th": "9", "10th": "10", "11th": "11", "12th": "12",
}

_ROMAN: dict[str, str] = {
    "i": "1", "ii": "2", "iii": "3", "iv": "4", "v": "5", "vi": "6", "vii": "7", "viii": "8",
    "ix": "9", "x": "10", "xi": "11", "xii": "12", "iva": "4a", "ivb": "4b",
}
#: Roman numerals that are also ordinary words or letters are converted only after these words
_ROMAN_CONTEXT = {"segment", "nerve", "cn", "ventricle", "lobule", "sector", "zone", "level", "area",
                  "couinaud", "type", "cranial", "layer", "rib", "costa", "station"}
_ROMAN_AMBIGUOUS = {"i", "v", "x"}

#: laterality words -> side
LATERALITY_WORDS: dict[str, str] = {
    "left": "left", "right": "right", "lt": "left", "rt": "right",
    "sinister": "left", "sinistra": "left", "sinistrum": "left", "dexter": "right",
    "dextra": "right", "dextrum": "right", "leftsided": "left", "rightsided": "right", "lft": "left", "rgt": "right",
}
_SIDE_FILLERS = {"sided", "side", "hand"}

#: leading instructions that are not part of the structure's name
_COMMAND_RE = re.compile(
    r"^(?:please\s+|pls\s+|can you\s+|could you\s+)?"
    r"(?:segment|outline|contour|delineate|label|mask|find|show|highlight|extract|locate|get)"
    r"(?:\s+(?:me|out))?\s+(?:the\s+|all\s+(?:the\s+)?|a\s+|an\s+)?(?=\D)(?![ivx]+\b|[1-8][ab]?\b)",
)
_VERTEBRA_LABEL_RE = re.compile(r"\b([ctls])\s*-?\s*(\d{1,2})\b")
_NON_WORD_RE = re.compile(r"[^a-z0-9&|]+")

# ---------------------------------------------------------------------------------------------
# level 2: fillers and adjective -> noun

_FILLERS = {
    "the", "of", "a", "an", "in", "on", "to", "and", "for", "structure", "entire", "organ",
    "proper", "region", "area", "gland", "bone", "muscle", "mask", "segmentation", "label",
    "body", "normal", "bilateral", "both", "all", "complete", "tissue", "human", "part",
    "portion", "system", "set", "volume", "its", "with", "whole",
}

_ADJECTIVE_NOUN: dict[str, str] = {
    "renal": "kidney",
    "nephric": "kidney",
    "hepatic": "liver",
    "pulmonary": "lung",
    "pulmonic": "lung",
    "cardiac": "heart",
    "splenic": "spleen",
    "gastric": "stomach",
    "pancreatic": "pancreas",
    "vertebral": "vertebra",
    "costal": "rib",
    "cerebral": "cerebrum",
    "esophageal": "esophagus",
    "duodenal": "duodenum",
    "colonic": "colon",
    "colic": "colon",
    "rectal": "rectum",
    "vesical": "bladder",
    "prostatic": "prostate",
    "adrenal": "adrenal",
    "suprarenal": "adrenal",
    "thyroidal": "thyroid",
    "tracheal": "trachea",
    "bronchial": "bronchus",
    "aortic": "aorta",
    "femoral": "femur",
    "humeral": "humerus",
    "sternal": "sternum",
    "sacral": "sacrum",
    "pleural": "pleura",
    "pericardial": "pericardium",
    "uterine": "uterus",
    "ovarian": "ovary",
    "testicular": "testis",
    "cecal": "cecum",
    "ileal": "ileum",
    "jejunal": "jejunum",
    "biliary": "bile",
    "neoplasm": "tumor",
    "neoplastic": "tumor",
    "tumoral": "tumor",
    "carcinoma": "tumor",
    "cancer": "tumor",
    "malignancy": "tumor",
    "lesional": "lesion",
    "cystic": "cyst",
    "nodular": "nodule",
    "edematous": "edema",
    "hemorrhagic": "hemorrhage",
    "necrotic": "necrosis",
    "enhancing": "enhancement",
    "vascular": "vessel",
}


def _strip_accents(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def _spell_us(word: str) -> str:
    word = _UK_US_WORDS.get(word, word)
    for pattern, replacement in _SPELLING_PATTERNS:
        word = pattern.sub(replacement, word)
    return word


def _singular(word: str) -> str:
    if word in _PLURALS:
        return _PLURALS[word]
    if len(word) <= 3 or word in _KEEP_S or not word.endswith("s") or word[-2].isdigit():
        return word
    if word.endswith(("ss", "us", "is", "os", "as")):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"  # arteries, bodies, ovaries
    if word.endswith(("ches", "shes", "xes", "sses")):
        return word[:-2]  # branches, sinuses handled above, boxes
    return word[:-1]


def split_laterality(text: str) -> tuple[str, str | None]:
    """Split a laterality marker off a text.

    Args:
        text: any prompt, e.g. "R kidney", "kidney, left", "left-sided kidney".

    Returns:
        (the level-1 normalised text without the laterality words, "left" | "right" | None).
        Text that names both sides ("left and right kidney") keeps no side.
    """
    key = normalize(text)
    if "|" in key:
        base, side = key.split("|", 1)
        return base, side
    return key, None


@lru_cache(maxsize=65536)
def normalize(text: str) -> str:
    """Level-1 normal form of a name, synonym or prompt.

    Args:
        text: free text, e.g. "Rt. Kidneys", "kidney, left", "Segment VII", "L-1 vertebra".

    Returns:
        Lower-case words separated by single spaces, with laterality moved to a ``|left`` or
        ``|right`` suffix: "kidney|right", "kidney|left", "segment 7", "l1 vertebra".
        An empty string when nothing is left.
    """
    text = _strip_accents(text).casefold().strip()
    text = text.replace("'s ", " ").replace("’s ", " ")
    text = _COMMAND_RE.sub("", text)
    text = _VERTEBRA_LABEL_RE.sub(r"\1\2", text)
    words = [w for w in _NON_WORD_RE.sub(" ", text.replace("|", " ")).split() if w]
    out: list[str] = []
    sides: set[str] = set()
    n = len(words)
    for i, word in enumerate(words):
        word = _spell_us(word)
        if word in ("left", "right") or word in LATERALITY_WORDS:
            sides.add(LATERALITY_WORDS[word])
            continue
        if word in ("l", "r") and n > 1 and (i == 0 or i == n - 1):
            sides.add("left" if word == "l" else "right")
            continue
        if word in _SIDE_FILLERS and sides and any(
            w in LATERALITY_WORDS or w in ("l", "r") for w in words[max(0, i - 2) : i]
        ):
            continue
        if word in ("bilateral", "bilat", "both"):
            continue
        word = _SHORTHAND.get(word, word)
        if " " in word:  # multi-word expansion ("tz" -> "transition zone")
            out.extend(word.split())
            continue
        word = _ORDINALS.get(word, word)
        if word in _ROMAN and i > 0:
            previous = out[-1] if out else ""
            if word not in _ROMAN_AMBIGUOUS or previous in _ROMAN_CONTEXT:
                word = _ROMAN[word]
        elif word in _ROMAN and word not in _ROMAN_AMBIGUOUS and n > 1:
            word = _ROMAN[word]
        if word == "the" and not out:
            continue
        out.append(_singular(word))
    base = " ".join(out)
    if len(sides) == 1 and base:
        return f"{base}|{sides.pop()}"
    return base


@lru_cache(maxsize=65536)
def token_key(text: str) -> str:
    """Level-2 key: the level-1 form as a sorted bag of content words.

    Args:
        text: free text.

    Returns:
        Sorted, de-duplicated content words joined by spaces, plus the ``|side`` suffix of
        :func:`normalize`: "upper lobe of the left lung" and "left lung upper lobe" give the
        same key "lobe lung upper|left". Empty when only filler words were given.
    """
    base, _, side = normalize(text).partition("|")
    words = {_ADJECTIVE_NOUN.get(w, w) for w in base.split() if w not in _FILLERS}
    words.discard("")
    if not words:
        return ""
    key = " ".join(sorted(words))
    return f"{key}|{side}" if side else key
