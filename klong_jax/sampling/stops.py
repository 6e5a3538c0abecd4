"""Stop strings, found on the host in decoded text between decode chunks."""
from collections.abc import Sequence


def find_stop_string(tokenizer, tokens: Sequence[int], stops: Sequence[str], scanned: int = 0):
    """(n_tokens, stop, text_before) for the shortest prefix tokens[:n_tokens] whose decoded text
    contains a stop string, or None. `scanned`: a prefix length already known to hold none.
    text_before is the decoded text up to where the (earliest) stop string starts."""
    if not stops or not any(s in tokenizer.decode(tokens) for s in stops):
        return None
    for n in range(max(scanned, 0) + 1, len(tokens) + 1):
        text = tokenizer.decode(tokens[:n])
        hits = [(text.find(s), s) for s in stops if s in text]
        if hits:
            start, stop = min(hits)
            return n, stop, text[:start]
    return None
