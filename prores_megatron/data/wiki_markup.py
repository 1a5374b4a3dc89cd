"""Readable prose from MediaWiki markup (Wikipedia article source), for the demo corpus.

Contract: ``wiki_sections(wikitext)`` returns ``[(heading, [paragraph, ...]), ...]`` for the
article's lead (heading ``""``) and each level-2 section, in order, with the article's prose kept
and the apparatus dropped:
* dropped: comments, ``<ref>`` and other non-prose elements (math, gallery, code listings,
  timelines), tables, templates (infoboxes, citations, navigation boxes, maintenance tags), file /
  image / category links, magic words, and whole back-matter sections (References, Notes, See also,
  External links, Further reading, Bibliography, ...);
* kept as text: link labels (``[[target|label]]`` → label, ``[[target]]s`` → targets), external link
  labels, bold/italic text, sub-headings (a line of their own), list items (one paragraph each), and
  the text of a few inline templates whose content is prose (``convert``, ``lang``, ``nowrap``,
  ``as of``, ``nihongo``, ...), HTML entities decoded.
The result is plain text with single spaces; empty paragraphs and sections are left out. It is a
heuristic reading of the markup for natural-language training text, not a MediaWiki renderer: a
dropped formula or template can leave a sentence with a gap, as it does in any plain-text dump.
"""

import html
import re

__all__ = ["wiki_sections"]

_BACK_MATTER = {
    "references", "notes", "footnotes", "citations", "sources", "see also", "external links",
    "further reading", "bibliography", "works cited", "notes and references", "references and notes",
    "gallery", "explanatory notes", "primary sources", "secondary sources", "general references",
    "cited sources", "cited works", "selected bibliography", "works",
}
# Elements whose content is not prose: removed with their content.
_DROP_ELEMENTS = ("ref", "math", "gallery", "timeline", "score", "source", "syntaxhighlight", "code",
                  "references", "hiero", "chem", "ce", "graph", "imagemap", "mapframe", "templatedata",
                  "pre", "includeonly")
_NAMESPACES = ("file", "image", "category", "media", "template", "wikipedia", "wp", "portal", "help",
               "special", "user", "talk")

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_DROP_PAIRED = re.compile(r"<\s*(%s)\b[^>]*?(?<!/)>.*?<\s*/\s*\1\s*>" % "|".join(_DROP_ELEMENTS), re.S | re.I)
_DROP_SINGLE = re.compile(r"<\s*(?:%s)\b[^>]*/\s*>" % "|".join(_DROP_ELEMENTS), re.I)
_BR = re.compile(r"<\s*br\s*/?\s*>", re.I)
_TAG = re.compile(r"</?\s*[a-zA-Z][a-zA-Z0-9]*\b[^<>]*>")
_TEMPLATE = re.compile(r"\{\{(?:(?!\{\{|\}\}).)*\}\}", re.S)  # innermost first
_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*\|\}", re.S)  # innermost first
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]([a-z]*)")  # innermost; a letter suffix joins the label
_PLAIN_LINK = re.compile(r"\[\[([^\[\]{}]*)\]\]([a-z]*)")  # one without a template inside
_MEDIA_LINK = re.compile(r"\[\[\s*:?\s*(?:file|image|media)\s*:", re.I)
_EXTERNAL = re.compile(r"\[(?:https?:|ftp:|//)[^\s\]]*\s*([^\]]*)\]")
_BARE_URL = re.compile(r"https?://\S+")
_QUOTES = re.compile(r"'{2,}")
_MAGIC = re.compile(r"__[A-Z]+__")
_HEADING = re.compile(r"^(={2,6})\s*(.*?)\s*\1\s*$")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_EMPTY_BRACKETS = re.compile(r"\(\s*[,;:]?\s*\)|\[\s*\]")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?)\]])")
_SPACE_AFTER_OPEN = re.compile(r"([(\[]) +")
_LEADING_PUNCT_IN_PARENS = re.compile(r"\(\s*[,;:]\s*")


def _params(body):
    name, *rest = body.split("|")
    pos, named = [], {}
    for part in rest:
        key, eq, value = part.partition("=")
        if eq and re.fullmatch(r"\s*[\w -]+\s*", key):
            named[key.strip().lower()] = value.strip()
        else:
            pos.append(part.strip())
    return name.strip().lower().replace("_", " "), pos, named


def _inline_template(match):
    """The prose a template stands for, or '' (most templates are apparatus)."""
    name, pos, named = _params(match.group(0)[2:-2])
    if name in ("!",):
        return "|"
    if name in ("·", "dot", "middot"):
        return " · "
    if name in ("snd", "ndash", "spaced ndash"):
        return " – "
    if name in ("mdash", "em dash"):
        return "—"
    if name in ("'", "apostrophe"):
        return "'"
    if name == "convert" and pos:
        # {{convert|5|km|mi}}, {{convert|5|-|10|km}}: the value(s) and the first unit as written.
        if len(pos) >= 4 and pos[1] in ("-", "to", "and", "or", "–", "x", "by"):
            return f"{pos[0]} {pos[1]} {pos[2]} {pos[3]}".replace(" - ", "–")
        return f"{pos[0]} {pos[1]}" if len(pos) > 1 else pos[0]
    if name in ("lang", "lang-x") and len(pos) >= 2:
        return pos[1]
    if name.startswith("lang-") and pos:
        return pos[0]
    if name in ("nowrap", "small", "smaller", "big", "larger", "nobold", "noitalic", "em", "strong",
                "sic", "not a typo", "vanchor", "visible anchor", "nobr", "serif", "sans-serif",
                "mvar", "math", "tooltip", "abbr", "keypress", "small caps", "smallcaps", "sc") and pos:
        return pos[0]
    if name in ("nihongo", "nihongo2", "nihongo3") and pos:
        return pos[0]
    if name in ("transl", "transliteration") and pos:
        return pos[-1]
    if name == "as of" and pos:
        return ("as of " if named.get("lc") else "As of ") + " ".join(pos[:3])
    if name in ("quote", "blockquote", "cquote", "quotation") and (pos or named.get("text")):
        return named.get("text") or named.get("quote") or pos[0]
    if name in ("ipa", "ipa-en", "iast", "unicode", "script", "linktext", "lsj") and pos:
        return pos[0]
    return ""


def _link(match):
    inner, suffix = match.group(1), match.group(2)
    target, bar, label = inner.partition("|")
    prefix = target.split(":", 1)[0].strip().lower() if ":" in target else ""
    if prefix in _NAMESPACES or target.startswith(":") and target[1:].split(":", 1)[0].lower() in _NAMESPACES:
        return ""  # images (with their captions), categories, project links
    if prefix and not bar and re.fullmatch(r"[a-z]{2,3}(-[a-z]+)?", prefix):
        return ""  # an interlanguage link
    if bar:
        text = label.rsplit("|", 1)[-1] if "|" in label else label  # [[a|b|c]]: the last part shows
        if not text.strip():  # the pipe trick [[Paris, Texas|]] shows the target without its qualifier
            text = re.sub(r"\s*\(.*\)$|,.*$", "", target.split(":", 1)[-1])
    else:
        text = target.split(":", 1)[-1] if prefix in ("wikt", "wiktionary", "s", "w", "wikiquote") else target
    if not bar and "#" in text:  # [[Page#Section]] reads as the page, [[#Section]] as the section
        page, _, anchor = text.partition("#")
        text = page or anchor
    return text + suffix


def _drop_media_links(text):
    """Remove [[File:...]] / [[Image:...]] with their captions, which may nest links and brackets."""
    out, pos = [], 0
    for m in _MEDIA_LINK.finditer(text):
        if m.start() < pos:
            continue  # inside a caption already removed
        out.append(text[pos:m.start()])
        depth, i = 0, m.start()
        while i < len(text):
            if text.startswith("[[", i):
                depth, i = depth + 1, i + 2
            elif text.startswith("]]", i):
                depth, i = depth - 1, i + 2
                if depth == 0:
                    break
            else:
                i += 1
        pos = i
    out.append(text[pos:])
    return "".join(out)


def _repeat(pattern, repl, text):
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return new
        text = new


def _clean_line(line):
    line = html.unescape(line)
    line = _SPACES.sub(" ", line).strip()
    line = _LEADING_PUNCT_IN_PARENS.sub("(", line)
    line = _repeat(_EMPTY_BRACKETS, "", line)
    line = _SPACE_AFTER_OPEN.sub(r"\1", line)
    line = _SPACE_BEFORE_PUNCT.sub(r"\1", line)
    line = _SPACES.sub(" ", line).strip()
    return line


def _is_prose(line):
    # Leftovers of tables, templates and link lists are not sentences: keep lines with words.
    letters = sum(c.isalpha() for c in line)
    return letters >= 3 and letters >= 0.3 * len(line.replace(" ", ""))


def wiki_sections(wikitext):
    text = wikitext.replace("\r\n", "\n")
    text = _COMMENT.sub("", text)
    text = _DROP_PAIRED.sub("", text)
    text = _DROP_SINGLE.sub("", text)
    text = _BR.sub(" ", text)
    text = _drop_media_links(text)
    # Links before templates (a link's "|" would split a template's parameters), except links
    # whose label holds a template: those are resolved after it.
    text = _repeat(_PLAIN_LINK, _link, text)
    text = _repeat(_TEMPLATE, _inline_template, text)
    text = _repeat(_TABLE, "", text)
    text = _repeat(_LINK, _link, text)  # links that templates or tables enclosed
    text = _EXTERNAL.sub(r"\1", text)
    text = _BARE_URL.sub("", text)
    text = _TAG.sub("", text)
    text = _QUOTES.sub("", text)
    text = _MAGIC.sub("", text)

    sections, heading, paras, skipping = [], "", [], False
    for raw in text.split("\n"):
        m = _HEADING.match(raw.strip())
        if m:
            title = _clean_line(m.group(2))
            if len(m.group(1)) == 2:
                if paras and not skipping:
                    sections.append((heading, paras))
                heading, paras = title, []
                skipping = title.lower() in _BACK_MATTER
            elif not skipping and title:
                paras.append(title)  # a sub-heading: a line of its own
            continue
        if skipping:
            continue
        line = raw.strip()
        if not line or line.startswith(("|", "!", "{", "}", "----")):
            continue  # table or template remnants, rules
        line = line.lstrip("*#:;").strip()
        line = _clean_line(line)
        if line and _is_prose(line):
            paras.append(line)
    if paras and not skipping:
        sections.append((heading, paras))
    # Drop sub-headings left with nothing under them at the end of a section.
    return [(h, p) for h, p in sections if any(len(x) > 80 for x in p)]
