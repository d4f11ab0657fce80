"""pacl_ray.core.text: social-media cleaning rules, each checked on a hand-written post."""

import pytest

from pacl_ray.core.text import clean_text, expand_contractions, hashtag_words


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("Look https://t.co/AbC123 here", "Look here"),
        ("see www.example.com/page?x=1 now", "see now"),
        ("@ann @bob_2 hello there", "hello there"),
        ("RT @news: Big day", "Big day"),
        ("mail ann@example.com please", "mail ann@example.com please"),  # not a mention
        ("I can't and won't", "I cannot and will not"),
        ("They're sure we've seen it, I'm glad", "They are sure we have seen it, I am glad"),
        ("it's John's dog", "it is John's dog"),  # possessive 's is kept
        ("don\u2019t stop", "do not stop"),  # curly apostrophe
        ("#SunnyDay at the #beach", "Sunny Day at the beach"),
        ("fish &amp; chips", "fish & chips"),
        ("  lots \n of\tspace  ", "lots of space"),
        ("https://only.a/link", ""),
        ("so happy \U0001F600!!", "so happy \U0001F600!!"),  # emoji and punctuation kept
    ],
)
def test_clean_text(raw, cleaned):
    assert clean_text(raw) == cleaned


def test_contraction_case_is_kept():
    assert expand_contractions("Won't") == "Will not"
    assert expand_contractions("Let's go") == "Let us go"


def test_hashtag_splitting():
    assert hashtag_words("#day2remember #love_it #USA") == "day 2 remember love it USA"
    assert hashtag_words("no tags") == "no tags"
