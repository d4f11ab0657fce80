"""Social-media text cleaning for post texts (pure; no I/O).

    clean_text("RT @ann: Can't believe it!! #SunnyDay https://t.co/x")
    -> "Cannot believe it!! Sunny Day"

Rules, in order: HTML entities unescaped; a leading retweet marker ("RT @user:") dropped; URLs
and @mentions removed; contractions expanded (pronoun "'s" only, since "'s" is usually
possessive); hashtags kept as words ("#SunnyDay" -> "Sunny Day"); whitespace collapsed. Case,
punctuation and emoji are kept because sentiment encoders use them. The raw text is stored
beside the cleaned one, so nothing here needs to be reversible.
"""

from __future__ import annotations

import html
import re

URL_RE = re.compile(r"(?:https?://|ftp://|www\.)\S+", re.IGNORECASE)
# "(?<![\w.])" keeps e-mail addresses like ann@example.com from being read as mentions.
MENTION_RE = re.compile(r"(?<![\w.])@\w+")
RETWEET_RE = re.compile(r"^\s*RT\b\s*(?:@\w+\s*)?:?\s*")
HASHTAG_RE = re.compile(r"(?<![\w&])#(\w+)")
# Split "SunnyDay" / "iPhoneLove" / "Day2Remember" at lower->upper and letter<->digit boundaries.
CAMEL_RE = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Za-z])(?=[0-9])|(?<=[0-9])(?=[A-Za-z])")
SPACE_RE = re.compile(r"\s+")

# Irregular forms first; the generic suffix rules below cover the rest.
IRREGULAR_CONTRACTIONS = {
    "won't": "will not",
    "can't": "cannot",
    "shan't": "shall not",
    "ain't": "am not",
    "let's": "let us",
    "y'all": "you all",
    "ma'am": "madam",
    "o'clock": "of the clock",
}
PRONOUN_S = ("it", "that", "what", "he", "she", "there", "here", "who", "where", "how")
SUFFIX_RULES = (
    (re.compile(r"(\w)n't\b", re.IGNORECASE), r"\1 not"),
    (re.compile(r"(\w)'re\b", re.IGNORECASE), r"\1 are"),
    (re.compile(r"(\w)'ve\b", re.IGNORECASE), r"\1 have"),
    (re.compile(r"(\w)'ll\b", re.IGNORECASE), r"\1 will"),
    (re.compile(r"(\w)'d\b", re.IGNORECASE), r"\1 would"),
    (re.compile(r"\b([Ii])'m\b"), r"\1 am"),
    (re.compile(r"\b(" + "|".join(PRONOUN_S) + r")'s\b", re.IGNORECASE), r"\1 is"),
)
IRREGULAR_RE = re.compile(
    r"\b(" + "|".join(re.escape(k) for k in IRREGULAR_CONTRACTIONS) + r")\b", re.IGNORECASE
)


def _match_case(word: str, replacement: str) -> str:
    """Keep the capitalisation of the contraction's first letter ("Won't" -> "Will not")."""
    return replacement[:1].upper() + replacement[1:] if word[:1].isupper() else replacement


def expand_contractions(text: str) -> str:
    """Expand English contractions; curly apostrophes are normalised to ASCII first."""
    text = text.replace("\u2019", "'").replace("\u02bc", "'")
    text = IRREGULAR_RE.sub(
        lambda m: _match_case(m.group(0), IRREGULAR_CONTRACTIONS[m.group(0).lower()]), text
    )
    for pattern, replacement in SUFFIX_RULES:
        text = pattern.sub(replacement, text)
    return text


def hashtag_words(text: str) -> str:
    """Replace each ``#tag`` by its words: ``#SunnyDay`` -> ``Sunny Day``, ``#love`` -> ``love``."""
    return HASHTAG_RE.sub(lambda m: CAMEL_RE.sub(" ", m.group(1)).replace("_", " "), text)


def clean_text(text: str) -> str:
    """The cleaned form of one social-media post (may be empty, e.g. for a URL-only post)."""
    text = html.unescape(text)
    text = RETWEET_RE.sub("", text)
    text = URL_RE.sub(" ", text)
    text = MENTION_RE.sub(" ", text)
    text = expand_contractions(text)
    text = hashtag_words(text)
    return SPACE_RE.sub(" ", text).strip()
