"""The project's modules as one index: which file a dotted import names, and the
definitions a call resolves to across files (the scans come from :mod:`.modules`)."""

from __future__ import annotations

import posixpath
from typing import Iterable, Mapping

from .modules import FileScan, Params, Ref, Use, scan_file

__all__ = ["ModuleIndex", "Project"]


def _dotted(path: str, base: str) -> str | None:
    """The module name of ``path`` for an import system rooted at directory ``base``."""
    if base and not path.startswith(base + "/"):
        return None
    rel = path[len(base) + 1:] if base else path
    parts = rel[: -len(".py")].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) if parts and all(p.isidentifier() for p in parts) else None


#: the path of a namespace package (a folder of modules without ``__init__.py``)
NAMESPACE = "<namespace>:"


class ModuleIndex:
    """Module names of a tree's paths: an import resolves against the script's directory
    (what ``python train.py`` puts on ``sys.path``) and against the repository root;
    relative imports against the importing file's package."""

    def __init__(self, paths: Iterable[str], script: str) -> None:
        self.script = script
        self.by_name: dict[str, str] = {}
        self.root_name: dict[str, str] = {}
        paths = list(paths)
        for base in (posixpath.dirname(script), ""):
            for path in paths:
                name = _dotted(path, base)
                if name:
                    self.by_name.setdefault(name, path)
                    if base == "":
                        self.root_name[path] = name

    def module(self, name: str) -> str | None:
        return self.by_name.get(name)

    def _import_base(self, path: str, module: str, level: int) -> str:
        if not level:
            return module
        pkg = self.root_name.get(path, "").split(".")
        if not path.endswith("__init__.py"):
            pkg = pkg[:-1]
        pkg = pkg[: len(pkg) - (level - 1)] if level > 1 else pkg
        return ".".join([p for p in pkg if p] + ([module] if module else []))

    def imported(self, path: str, scan: FileScan) -> set[str]:
        """The paths of the project's modules that the imports of ``path`` load (packages too)."""
        out: set[str] = set()
        wanted = [(m, n, lv) for _, m, n, lv in scan.imports] + [(m, None, lv) for m, lv, _ in scan.stars]
        for module, name, level in wanted:
            base = self._import_base(path, module, level)
            parts = base.split(".") if base else []
            names = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
            names += [f"{base}.{name}" if base else name] if name else []
            out |= {p for p in map(self.module, names) if p is not None}
        return out


class Project(ModuleIndex):
    """The project's files, and the resolution of names across them."""

    def __init__(self, texts: Mapping[str, str], script: str) -> None:
        self.scans: dict[str, FileScan] = {}
        for path, text in texts.items():
            scan = scan_file(path, text)
            if scan is not None:
                self.scans[path] = scan
        super().__init__(self.scans, script)
        self._bindings: dict[str, dict[str, Ref]] = {}
        self._resolved: dict[tuple, Ref | None] = {}
        self._targets: dict[str, list[tuple[Use, Ref]]] = {}

    def bindings(self, path: str) -> dict[str, Ref]:
        """Names bound at the top of ``path`` to the project's modules and defs."""
        if path in self._bindings:
            return self._bindings[path]
        scan = self.scans[path]
        out = {d: Ref(path, d) for d in scan.defs if "." not in d}
        for bound, module, name, level in scan.imports:
            base = self._import_base(path, module, level)
            if name is None:
                target = self.module(base)
                if target is not None:
                    out[bound] = Ref(target)
                elif any(n.startswith(base + ".") for n in self.by_name):  # a namespace package
                    out[bound] = Ref(NAMESPACE + base)
                continue
            sub = self.module(f"{base}.{name}" if base else name)
            target = self.module(base)
            if sub is not None:
                out[bound] = Ref(sub)
            elif target is not None:
                out[bound] = Ref(target, name)
        self._bindings[path] = out
        return out

    def canonical(self, ref: Ref, depth: int = 0) -> Ref | None:
        """The def a re-exported name stands for (``from .model import Net`` in a package)."""
        if ref.qual is None or ref.qual in self.scans[ref.path].defs or depth > 8:
            return ref
        head, *rest = ref.qual.split(".")
        again = self.bindings(ref.path).get(head)
        if again is None or again == ref:
            return None
        for part in rest:
            again = self.member(again, part, depth + 1)
            if again is None:
                return None
        return self.canonical(again, depth + 1)

    def member(self, ref: Ref, attr: str, depth: int = 0) -> Ref | None:
        if ref.path.startswith(NAMESPACE):
            name = f"{ref.path[len(NAMESPACE):]}.{attr}"
            sub = self.module(name)
            if sub is not None:
                return Ref(sub)
            return Ref(NAMESPACE + name) if any(n.startswith(name + ".") for n in self.by_name) else None
        if ref.qual is None:
            name = self.root_name.get(ref.path)
            sub = self.module(f"{name}.{attr}") if name else None
            if sub is not None:
                return Ref(sub)
            return self.canonical(Ref(ref.path, attr), depth) if attr in self.bindings(ref.path) else None
        if ref.qual in self.scans[ref.path].classes:
            return Ref(ref.path, f"{ref.qual}.{attr}")
        return None

    def targets(self, path: str) -> list[tuple[Use, Ref]]:
        """The references of ``path`` that name the project's modules and defs, with what they name."""
        if path not in self._targets:
            found = ((use, self.resolve(path, use)) for use in self.scans[path].uses)
            self._targets[path] = [(use, ref) for use, ref in found if ref is not None]
        return self._targets[path]

    def resolve(self, path: str, use: Use) -> Ref | None:
        """The module or def a reference in ``path`` names, when it is the project's."""
        key = (path, use.parts, use.owner if use.parts[0] == "self" else None)
        if key not in self._resolved:
            self._resolved[key] = self._resolve(path, use)
        return self._resolved[key]

    def _resolve(self, path: str, use: Use) -> Ref | None:
        parts = use.parts
        if parts[0] == "self" and use.owner and "." in use.owner and len(parts) > 1:
            ref: Ref | None = Ref(path, f"{use.owner.rsplit('.', 1)[0]}.{parts[1]}")
            parts = parts[2:]
            return ref if not parts else None
        ref = self.bindings(path).get(parts[0])
        if ref is None:
            return None
        ref = self.canonical(ref)
        for part in parts[1:]:
            if ref is None or (ref.qual is not None and ref.qual not in self.scans[ref.path].classes):
                return ref  # an attribute of a function's result: the function is what is named
            ref = self.member(ref, part)
        return ref

    def family(self, cls: Ref) -> set[Ref]:
        """``cls`` and the classes of the project derived from it."""
        out = {cls}
        grew = True
        while grew:
            grew = False
            for path, scan in self.scans.items():
                for name, bases in scan.classes.items():
                    ref = Ref(path, name)
                    if ref in out:
                        continue
                    for b in bases:
                        use = Use(b, 0, False, None, None, False, False)
                        if self.resolve(path, use) in out:
                            out.add(ref)
                            grew = True
                            break
        return out

    def is_class(self, ref: Ref) -> bool:
        return ref.qual is not None and ref.qual in self.scans[ref.path].classes

    def mutated_params(self, ref: Ref) -> Params | None:
        """What calling the def ``ref`` may mutate of its arguments (None: not a def of the project).

        A class: every argument (its methods may keep and change them). A parameter passed on
        to a def of the project or to an in-place function counts as mutated."""
        scan = self.scans.get(ref.path)
        if scan is None or ref.qual is None or ref.qual not in scan.defs:
            return None
        if ref.qual in scan.classes:
            return Params((), True, frozenset(), ())
        own = scan.params(ref.qual)
        more = {p for callee, p in own.passed if callee[-1].endswith("_") or self._is_def(ref, callee)}
        return Params(own.names, own.star, own.mutated | more, own.passed)

    def _is_def(self, ref: Ref, callee: tuple[str, ...]) -> bool:
        target = self.resolve(ref.path, Use(callee, 0, True, ref.qual, None, False, False))
        return target is not None and target.qual is not None

    def scan_of(self, ref: Ref) -> FileScan | None:
        return self.scans.get(ref.path)
