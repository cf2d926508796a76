"""GumTree-style matching of two statement trees.

Three phases, as in Falleri et al., "Fine-grained and accurate source code
differencing" (ASE 2014), adapted to statement granularity:

1. top-down: subtrees whose exact hash is unique in both files are matched with all
   their descendants (an unchanged function, an unchanged line); then lines whose
   alpha-normalised hash is unique and that mostly agree on names (moved *and*
   renamed, e.g. a step extracted into a function over differently named objects);
2. bottom-up: an unmatched compound statement is matched to the same-kind target
   statement that holds most of its matched descendants (Dice >= ``MIN_DICE``), which
   is how a loop survives a changed header or a def survives an edited body;
3. recovery: inside every matched pair, the still unmatched children of each suite
   are aligned in order (longest common subsequence) by exact label, then by
   alpha-normalised label (a rename), then by kind/header and token similarity.

Pairs whose alpha-normalised labels agree give rename evidence: position by position,
which name today stands where which name stood then.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Callable, Sequence

from ._tree import SNode, Tree, local_names, resolve_scope

MIN_DICE = 0.3  # GumTree's default minimum similarity is 0.5 on all nodes; statements
# are coarser (one node is a whole line), so a looser bound still keeps false matches out.
MIN_TOKEN_SIM = 0.6  # two edited lines match when 60% of their tokens agree
MIN_TOPDOWN_TOKENS = 6  # ``pass``/``continue``/``break`` are too generic to anchor alone


class Matching:
    """A partial one-to-one map between source and target statement nodes."""

    def __init__(self, src: Tree, tgt: Tree):
        self.src, self.tgt = src, tgt
        self.s2t: dict[int, SNode] = {}
        self.t2s: dict[int, SNode] = {}
        # (source scope pre, source name) -> Counter of target names
        self.evidence: dict[tuple[int, str], Counter[str]] = defaultdict(Counter)
        # "base.attr" today -> Counter of "base.attr" then (``self.net`` -> ``self.model``)
        self.attr_evidence: dict[str, Counter[str]] = defaultdict(Counter)
        self.src_locals = local_names(src)
        self._run()

    # ------------------------------------------------------------------ queries

    def target_of(self, node: SNode) -> SNode | None:
        return self.s2t.get(node.pre)

    def matched_descendants(self, node: SNode) -> int:
        return sum(1 for n in self.src.nodes[node.pre + 1:node.last + 1] if n.pre in self.s2t)

    # ------------------------------------------------------------------ phases

    def _run(self) -> None:
        self._link(self.src.root, self.tgt.root)
        self._top_down()
        self._renamed_anywhere()
        self._bottom_up()
        self._recover_all(self.src.root)

    def _link(self, s: SNode, t: SNode) -> None:
        self.s2t[s.pre] = t
        self.t2s[t.pre] = s
        if s.alpha2 == t.alpha2 and s.parent is not None:
            self._record_evidence(s, t)

    def _link_iso(self, s: SNode, t: SNode) -> None:
        """Match two subtrees of equal (exact or alpha) hash node by node."""
        self._link(s, t)
        for (_, skids), (_, tkids) in zip(s.suites, t.suites):
            for a, b in zip(skids, tkids):
                self._link_iso(a, b)

    def _free(self, s: SNode, t: SNode) -> bool:
        return s.pre not in self.s2t and t.pre not in self.t2s

    def _top_down(self) -> None:
        src_by: dict[int, list[SNode]] = defaultdict(list)
        tgt_by: dict[int, list[SNode]] = defaultdict(list)
        for n in self.src.nodes[1:]:
            src_by[n.hash].append(n)
        for n in self.tgt.nodes[1:]:
            tgt_by[n.hash].append(n)
        for s in self.src.nodes[1:]:  # preorder: ancestors before descendants
            if s.pre in self.s2t:
                continue
            ss, ts = src_by[s.hash], tgt_by.get(s.hash, ())
            if len(ss) != 1 or len(ts) != 1:
                continue
            t = ts[0]
            if t.pre in self.t2s or (not s.compound and len(s.tokens) < MIN_TOPDOWN_TOKENS):
                continue
            self._link_iso(s, t)

    def _renamed_anywhere(self) -> None:
        """Unique alpha-equal leftovers that mostly agree on names: moved *and* renamed.

        A step extracted into ``def train_step(model, ...)`` in one version and inline
        over ``net`` in the other shares no parent with its counterpart, so recovery
        never sees it; a unique, mostly-identical statement is still the same one.
        """
        src_by: dict[int, list[SNode]] = defaultdict(list)
        tgt_by: dict[int, list[SNode]] = defaultdict(list)
        for n in self.src.nodes[1:]:
            if n.pre not in self.s2t and not n.compound:
                src_by[n.ahash].append(n)
        for n in self.tgt.nodes[1:]:
            if n.pre not in self.t2s and not n.compound:
                tgt_by[n.ahash].append(n)
        for h, ss in src_by.items():
            ts = tgt_by.get(h, ())
            if len(ss) != 1 or len(ts) != 1 or len(ss[0].tokens) < MIN_TOPDOWN_TOKENS:
                continue
            s, t = ss[0], ts[0]
            differ = sum(a != b for a, b in zip(s.names, t.names))
            if differ * 2 <= len(s.names):
                self._link(s, t)

    def _bottom_up(self) -> None:
        for s in reversed(self.src.nodes[1:]):  # descendants before ancestors
            if s.pre in self.s2t or not s.compound:
                continue
            t = self._best_container(s)
            if t is not None:
                self._link(s, t)
                self._recover(s, t)

    def _best_container(self, s: SNode) -> SNode | None:
        counts: Counter[int] = Counter()
        for d in self.src.nodes[s.pre + 1:s.last + 1]:
            t = self.s2t.get(d.pre)
            if t is None:
                continue
            for a in t.ancestors():
                if a.parent is not None:
                    counts[a.pre] += 1
        best, best_score = None, 0.0
        for pre, common in counts.items():
            t = self.tgt.nodes[pre]
            if t.pre in self.t2s or t.kind != s.kind:
                continue
            dice = 2.0 * common / (s.size + t.size)
            if t.alpha == s.alpha:
                dice += 0.2  # same header: a tie-breaker, and a lower bar
            if dice > best_score:
                best, best_score = t, dice
        return best if best_score >= MIN_DICE else None

    def _recover_all(self, s: SNode) -> None:
        t = self.s2t.get(s.pre)
        if t is not None and (s.compound or s.parent is None):
            self._recover(s, t)
        for kid in s.children():
            if kid.compound:
                self._recover_all(kid)

    def _recover(self, s: SNode, t: SNode) -> None:
        if s.kind != t.kind:
            return
        for key, skids in s.suites:
            tkids = t.suite(key)
            if tkids is None:
                continue
            self._align(skids, tkids, lambda a, b: a.hash == b.hash, iso=True)
            self._align(skids, tkids, lambda a, b: a.ahash == b.ahash, iso=True)
            # attribute renames (``self.net(x)`` then ``self.model(x)``), between neighbours
            self._align_gaps(skids, tkids, _same_alpha2)
            self._align_gaps(skids, tkids, _same_header)
            self._align_gaps(skids, tkids, self._similar)
        for kid in s.children():
            u = self.s2t.get(kid.pre)
            if kid.compound and u is not None:
                self._recover(kid, u)

    def _align(self, skids: Sequence[SNode], tkids: Sequence[SNode],
               same: Callable[[SNode, SNode], bool], iso: bool) -> None:
        a = [n for n in skids if n.pre not in self.s2t]
        b = [n for n in tkids if n.pre not in self.t2s]
        if not a or not b:
            return
        for s, t in _lcs(a, b, same):
            if self._free(s, t):
                (self._link_iso if iso else self._link)(s, t)

    def _similar(self, a: SNode, b: SNode) -> bool:
        """Edited statements: similar tokens, or (blocks) mostly the same contents."""
        if a.kind != b.kind:
            return False
        if a.compound:
            if _token_sim(a, b) >= MIN_TOKEN_SIM:
                return True
            common = sum(
                1 for d in self.src.nodes[a.pre + 1:a.last + 1]
                if (u := self.s2t.get(d.pre)) is not None and b.contains(u)
            )
            return 2.0 * common / max(1, a.size + b.size) >= MIN_DICE
        if a.has_log or b.has_log:
            return False  # a log line is the same log or a new one, never an "edit"
        return _token_sim(a, b) >= MIN_TOKEN_SIM

    def _align_gaps(self, skids: Sequence[SNode], tkids: Sequence[SNode],
                    same: Callable[[SNode, SNode], bool]) -> None:
        """Pair edited statements, each only between its matched neighbours' counterparts."""
        where = {t.pre: j for j, t in enumerate(tkids)}
        for i, s in enumerate(skids):
            if s.pre in self.s2t:
                continue
            before = [where[u.pre] for k in skids[:i]
                      if (u := self.s2t.get(k.pre)) is not None and u.pre in where]
            after = [where[u.pre] for k in skids[i + 1:]
                     if (u := self.s2t.get(k.pre)) is not None and u.pre in where]
            lo, hi = max(before, default=-1), min(after, default=len(tkids))
            for t in tkids[lo + 1:hi]:
                if t.pre not in self.t2s and same(s, t):
                    self._link(s, t)
                    break

    # ------------------------------------------------------------------ renames

    def _record_evidence(self, s: SNode, t: SNode) -> None:
        """Pair the names of two alpha-equal labels, if they form a consistent renaming."""
        forward: dict[str, str] = {}
        backward: dict[str, str] = {}
        for a, b in zip(s.names, t.names):
            if forward.setdefault(a, b) != b or backward.setdefault(b, a) != a:
                return  # not a pure renaming: no evidence
        afwd: dict[str, str] = {}
        abwd: dict[str, str] = {}
        for (ba, aa), (bb, ab) in zip(s.attrs, t.attrs):
            x, y = f"{ba}.{aa}", f"{bb}.{ab}"
            if afwd.setdefault(x, y) != y or abwd.setdefault(y, x) != x:
                break  # attributes do not rename consistently: no attribute evidence
        else:
            for x, y in afwd.items():
                self.attr_evidence[x][y] += 1
        for a, b in forward.items():
            # a def's parameters live in its own scope, the rest of its header outside
            at = s.parent if s.is_def and a not in s.params else s
            scope = resolve_scope(a, at, self.src_locals)  # type: ignore[arg-type]
            self.evidence[(scope, a)][b] += 1


def _same_alpha2(a: SNode, b: SNode) -> bool:
    """The same line up to renamed attributes: same names, and enough else in common.

    ``opt.step()`` and ``opt.zero_grad()`` differ in their one attribute and share only
    ``opt``: two different calls, not a rename; ``out = self.net(x)`` and
    ``out = self.model(x)`` share ``out``, ``self`` and ``x``.
    """
    if a.compound or b.compound or a.has_log or b.has_log:
        return False
    if a.alpha2 != b.alpha2 or a.names != b.names:
        return False
    differ = sum(x != y for x, y in zip(a.attrs, b.attrs))
    return differ > 0 and len(_content(a.tokens)) - differ >= 2


def _same_header(a: SNode, b: SNode) -> bool:
    return a.compound and a.kind == b.kind and a.alpha == b.alpha


def _content(tokens: tuple[str, ...]) -> list[str]:
    """Identifiers, attributes and constants: what an edit changes, not the syntax."""
    return [t for t in tokens if t not in _PUNCT and not t.endswith("(")]


_PUNCT = frozenset({")", "[", "]", ";", "None"})


def _token_sim(a: SNode, b: SNode) -> float:
    ta, tb = _content(a.tokens), _content(b.tokens)
    common = sum((Counter(ta) & Counter(tb)).values())
    return 2.0 * common / max(1, len(ta) + len(tb))


def _lcs(a: Sequence[SNode], b: Sequence[SNode],
         same: Callable[[SNode, SNode], bool]) -> list[tuple[SNode, SNode]]:
    n, m = len(a), len(b)
    if n * m > 250_000:  # pathological sizes: fall back to a greedy in-order scan
        out, j = [], 0
        for x in a:
            for k in range(j, m):
                if same(x, b[k]):
                    out.append((x, b[k]))
                    j = k + 1
                    break
        return out
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        row, nxt = table[i], table[i + 1]
        for j in range(m - 1, -1, -1):
            row[j] = nxt[j + 1] + 1 if same(a[i], b[j]) else max(nxt[j], row[j + 1])
    out, i, j = [], 0, 0
    while i < n and j < m:
        if same(a[i], b[j]) and table[i][j] == table[i + 1][j + 1] + 1:
            out.append((a[i], b[j]))
            i += 1
            j += 1
        elif table[i + 1][j] >= table[i][j + 1]:
            i += 1
        else:
            j += 1
    return out
