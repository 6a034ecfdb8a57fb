#!/usr/bin/env python3
"""Print a crate's public API from rustdoc's JSON output, one item per line.

    scripts/public_api.py target/doc/saga_core.json > saga-core/public-api.txt
    scripts/public_api.py target/doc/saga_kafka.json --extern target/doc/saga_core.json

scripts/public-api.sh runs this for both library crates and keeps the
listings in saga-core/public-api.txt and saga-kafka/public-api.txt, so that a
change to the public API shows up as a diff in code review (and
`scripts/public-api.sh --check`, a phase of scripts/test.sh, fails when a
listing is out of date). Make the JSON with (nightly-only flags, allowed on
stable by RUSTC_BOOTSTRAP=1):

    RUSTC_BOOTSTRAP=1 RUSTDOCFLAGS="-Z unstable-options --output-format json" \
        cargo doc -p saga-core --no-deps --all-features

What is listed: every module, struct, union, enum (with its variants and
their fields), trait (with its methods and associated items), function,
constant, static, type alias and macro reachable from the crate root through
public modules and `pub use` re-exports, under the path users write
(`saga_core::SagaHandle`, not the private module it is defined in; an item
reachable by two paths is listed under both, its members under the shortest);
public struct fields; the methods and associated items of inherent impls with
their signatures; and one line per trait implementation, leaving out the
blanket impls that rustdoc copies onto every type (`impl<T> From<T> for T`,
`Any`, `Borrow`, ...) and the synthetic ones (auto traits: `Send`, `Sync`,
...). A blanket impl this crate itself declares (`impl<T: ...> SagaData for T`)
is listed once, under its trait: it decides which types implement it.
`#[non_exhaustive]` and `#[deprecated]` items are marked; a struct with private
fields ends in `{ .. }` (a tuple struct shows them as `_`), and a trait method
with a default body is marked `(provided)`.

Types are rendered from the JSON, not copied from the source: paths are
resolved (this crate's items by their public path, other crates' items by
the path where they are defined, or, for crates given with --extern, by
their public path there), and lifetimes are left out (`'static` stays, it is
part of the contract), which hides the `'life0`/`'async_trait` noise of
`#[async_trait]`.

Lines are grouped by the item they belong to (a type, then its fields or
variants, its inherent methods, its trait impls), sorted by path, so that the
output is deterministic and a type's lines stay together.

The JSON format changes between toolchains (`format_version`); a version this
script was not written for is refused (exit 2), never guessed at.

Standard library only (Python 3.8+).
"""

import argparse
import json
import sys

# rustdoc JSON format versions this script understands (rustc 1.95: 57).
SUPPORTED_FORMAT_VERSIONS = (57,)

KIND_KEYWORD = {
    "module": "mod",
    "struct": "struct",
    "union": "union",
    "enum": "enum",
    "trait": "trait",
    "trait_alias": "trait",
    "function": "fn",
    "constant": "const",
    "static": "static",
    "type_alias": "type",
    "macro": "macro",
    "proc_attribute": "attribute macro",
    "proc_derive": "derive macro",
    "extern_type": "type",
    "extern_crate": "extern crate",
    "primitive": "primitive",
}


class ApiError(Exception):
    pass


def load(path):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ApiError(f"cannot read {path}: {e.strerror}")
    except ValueError as e:
        raise ApiError(f"{path} is not JSON: {e}")
    version = data.get("format_version") if isinstance(data, dict) else None
    if version is None:
        raise ApiError(f"{path} has no format_version: is it rustdoc's JSON output?")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        expected = " or ".join(str(v) for v in SUPPORTED_FORMAT_VERSIONS)
        raise ApiError(
            f"{path}: rustdoc JSON format_version {version}, but this script "
            f"expects format_version {expected} (the JSON of rustc 1.95). The "
            f"toolchain changed: update scripts/public_api.py to the new format "
            f"(https://github.com/rust-lang/rustdoc-types/blob/trunk/CHANGELOG.md) "
            f"and add the version to SUPPORTED_FORMAT_VERSIONS."
        )
    return data


def kind_of(item):
    (kind,) = item["inner"].keys()
    return kind


class Crate:
    """One rustdoc JSON file: its items and their public paths."""

    def __init__(self, data):
        self.data = data
        self.index = data["index"]
        self.paths = data["paths"]
        self.root = self.index[str(data["root"])]
        self.name = self.root["name"]
        # id -> every public path (a tuple of segments) it is reachable by.
        self.public_paths = {}
        # (path, item id or None, text) of `pub use` of items not in this JSON.
        self.foreign_reexports = []
        self._walk(self.root, (self.name,), ())
        self.add_path(self.root["id"], (self.name,))

    def item(self, id_):
        return self.index.get(str(id_))

    def add_path(self, id_, path):
        self.public_paths.setdefault(id_, set()).add(path)

    def canonical(self, id_):
        """The shortest public path of an item, or None if it has none."""
        paths = self.public_paths.get(id_)
        if not paths:
            return None
        return min(paths, key=lambda p: (len(p), p))

    def _walk(self, module, prefix, stack):
        if module["id"] in stack:
            return
        stack = stack + (module["id"],)
        for child_id in module["inner"]["module"]["items"]:
            child = self.item(child_id)
            if child is None or child["visibility"] != "public":
                continue
            self._visit(child, prefix, stack)

    def _visit(self, child, prefix, stack):
        kind = kind_of(child)
        if kind == "use":
            use = child["inner"]["use"]
            target = self.item(use["id"]) if use["id"] is not None else None
            if use["is_glob"]:
                if target is not None and kind_of(target) == "module":
                    self._walk(target, prefix, stack)
                elif target is not None and kind_of(target) == "enum":
                    for v in target["inner"]["enum"]["variants"]:
                        var = self.item(v)
                        self.foreign_reexports.append(
                            (prefix + (var["name"],), v, use["source"] + "::" + var["name"]))
                else:
                    self.foreign_reexports.append((prefix + ("*",), use["id"], use["source"] + "::*"))
                return
            path = prefix + (use["name"],)
            if target is None:
                self.foreign_reexports.append((path, use["id"], use["source"]))
            elif kind_of(target) == "module":
                self.add_path(target["id"], path)
                self._walk(target, path, stack)
            else:
                self.add_path(target["id"], path)
            return
        if child.get("name") is None:
            return
        path = prefix + (child["name"],)
        self.add_path(child["id"], path)
        if kind == "module":
            self._walk(child, path, stack)


class Lister:
    def __init__(self, crate, externs):
        self.c = crate
        # defining path (tuple) -> public path (tuple), from --extern crates.
        self.extern_paths = {}
        for ext in externs:
            for id_, paths in ext.public_paths.items():
                summary = ext.paths.get(str(id_))
                if summary is None or summary["crate_id"] != 0:
                    continue
                public = ext.canonical(id_)
                self.extern_paths.setdefault(tuple(summary["path"]), public)
        self.lines = []  # (group path, rank, member sort key, text)

    # ---- paths -------------------------------------------------------------

    def path_of(self, id_, written):
        """How to write the item with this id: its public path if it has one."""
        own = self.c.canonical(id_)
        if own is not None:
            return "::".join(own)
        summary = self.c.paths.get(str(id_))
        if summary is not None:
            path = tuple(summary["path"])
            return "::".join(self.extern_paths.get(path, path))
        return written.lstrip(":") or "?"

    def local_ids(self, ty, out):
        """Collect the ids of this crate's public items a type mentions."""
        if isinstance(ty, dict):
            if "id" in ty and "path" in ty and self.c.canonical(ty["id"]) is not None:
                out.append(ty["id"])
            for v in ty.values():
                self.local_ids(v, out)
        elif isinstance(ty, list):
            for v in ty:
                self.local_ids(v, out)
        return out

    def private_ids(self, ty, out):
        """Ids of this crate's items a type mentions that are not public."""
        if isinstance(ty, dict):
            if "id" in ty and "path" in ty:
                summary = self.c.paths.get(str(ty["id"]))
                local = (summary is not None and summary["crate_id"] == 0) or (
                    summary is None and self.c.item(ty["id"]) is not None
                    and self.c.item(ty["id"])["crate_id"] == 0)
                if local and self.c.canonical(ty["id"]) is None:
                    out.append(ty["id"])
            for v in ty.values():
                self.private_ids(v, out)
        elif isinstance(ty, list):
            for v in ty:
                self.private_ids(v, out)
        return out

    # ---- types -------------------------------------------------------------

    @staticmethod
    def keep_lifetime(lt):
        return lt == "'static"

    def ty(self, t):
        if t is None:
            return "()"
        if t == "infer":
            return "_"
        (kind, v), = t.items()
        if kind == "resolved_path":
            return self.path(v)
        if kind == "dyn_trait":
            parts = [self.poly_trait(p) for p in v["traits"]]
            if v.get("lifetime") and self.keep_lifetime(v["lifetime"]):
                parts.append(v["lifetime"])
            return "dyn " + " + ".join(parts)
        if kind == "generic":
            return v
        if kind == "primitive":
            return v
        if kind == "function_pointer":
            return self.fn_pointer(v)
        if kind == "tuple":
            if len(v) == 1:
                return "(" + self.ty(v[0]) + ",)"
            return "(" + ", ".join(self.ty(x) for x in v) + ")"
        if kind == "slice":
            return "[" + self.ty(v) + "]"
        if kind == "array":
            return "[" + self.ty(v["type"]) + "; " + v["len"] + "]"
        if kind == "pat":
            return self.ty(v["type"]) + " is " + v.get("__pat_unstable_do_not_use", "_")
        if kind == "impl_trait":
            return "impl " + self.bounds(v)
        if kind == "infer":
            return "_"
        if kind == "raw_pointer":
            return ("*mut " if v["is_mutable"] else "*const ") + self.pointee(v["type"])
        if kind == "borrowed_ref":
            lt = v.get("lifetime")
            lt = lt + " " if lt and self.keep_lifetime(lt) else ""
            return "&" + lt + ("mut " if v["is_mutable"] else "") + self.pointee(v["type"])
        if kind == "qualified_path":
            args = self.generic_args(v.get("args"))
            self_ty = self.ty(v["self_type"])
            trait = v.get("trait")
            if trait is None or trait["path"] == "":
                # Written `T::Name` (or an inherent associated type).
                return f"{self_ty}::{v['name']}{args}"
            return f"<{self_ty} as {self.path(trait)}>::{v['name']}{args}"
        raise ApiError(f"unknown type kind {kind!r}")

    def pointee(self, t):
        """A type after `&` or `*const`: `&(dyn A + B)`, not `&dyn A + B`."""
        out = self.ty(t)
        if isinstance(t, dict) and ("dyn_trait" in t or "impl_trait" in t) and " + " in out:
            return "(" + out + ")"
        return out

    def path(self, p):
        return self.path_of(p["id"], p["path"]) + self.generic_args(p.get("args"))

    def generic_args(self, args):
        if not args:
            return ""
        (kind, v), = args.items() if isinstance(args, dict) else ((args, None),)
        if kind == "angle_bracketed":
            parts = []
            for a in v["args"]:
                (ak, av), = a.items() if isinstance(a, dict) else ((a, None),)
                if ak == "lifetime":
                    if self.keep_lifetime(av):
                        parts.append(av)
                elif ak == "type":
                    parts.append(self.ty(av))
                elif ak == "const":
                    parts.append(self.const_expr(av))
                elif ak == "infer":
                    parts.append("_")
                else:
                    raise ApiError(f"unknown generic argument {ak!r}")
            for c in v["constraints"]:
                parts.append(self.constraint(c))
            return "<" + ", ".join(parts) + ">" if parts else ""
        if kind == "parenthesized":
            out = "(" + ", ".join(self.ty(x) for x in v["inputs"]) + ")"
            if v.get("output") is not None:
                out += " -> " + self.ty(v["output"])
            return out
        if kind == "return_type_notation":
            return "(..)"
        raise ApiError(f"unknown generic args {kind!r}")

    @staticmethod
    def const_expr(c):
        return c["expr"]

    def constraint(self, c):
        name = c["name"] + self.generic_args(c.get("args"))
        (bk, bv), = c["binding"].items()
        if bk == "equality":
            return name + " = " + self.term(bv)
        if bk == "constraint":
            return name + ": " + self.bounds(bv)
        raise ApiError(f"unknown constraint kind {bk!r}")

    def term(self, t):
        (k, v), = t.items()
        if k == "type":
            return self.ty(v)
        if k == "constant":
            return self.const_expr(v)
        raise ApiError(f"unknown term kind {k!r}")

    def hrtb(self, params):
        kept = [self.generic_param(p) for p in params]
        kept = [p for p in kept if p]
        return "for<" + ", ".join(kept) + "> " if kept else ""

    def poly_trait(self, p):
        return self.hrtb(p.get("generic_params", [])) + self.path(p["trait"])

    def bound(self, b):
        (k, v), = b.items()
        if k == "trait_bound":
            modifier = {"none": "", "maybe": "?", "maybe_const": "~const "}.get(v["modifier"])
            if modifier is None:
                raise ApiError(f"unknown trait bound modifier {v['modifier']!r}")
            return self.hrtb(v.get("generic_params", [])) + modifier + self.path(v["trait"])
        if k == "outlives":
            return v if self.keep_lifetime(v) else None
        if k == "use":
            args = []
            for a in v:
                (ak, av), = a.items()
                if ak == "param":
                    args.append(av)
                elif ak == "lifetime":
                    if self.keep_lifetime(av):
                        args.append(av)
                else:
                    raise ApiError(f"unknown precise capturing arg {ak!r}")
            if not args and v:
                return None  # captured lifetimes only
            return "use<" + ", ".join(args) + ">"
        raise ApiError(f"unknown bound kind {k!r}")

    def bounds(self, bs):
        return " + ".join(x for x in (self.bound(b) for b in bs) if x)

    def fn_pointer(self, fp):
        h = fp["header"]
        out = self.hrtb(fp.get("generic_params", []))
        out += self.header(h)
        ins = ", ".join(self.ty(t) for _, t in fp["sig"]["inputs"])
        if fp["sig"].get("is_c_variadic"):
            ins += ", ..."
        out += "fn(" + ins + ")"
        if fp["sig"].get("output") is not None:
            out += " -> " + self.ty(fp["sig"]["output"])
        return out

    @staticmethod
    def abi(abi):
        if abi == "Rust":
            return ""
        if isinstance(abi, dict):
            (k, v), = abi.items()
            if k == "Other":
                return f'extern "{v}" '
            name = {"C": "C", "Cdecl": "cdecl", "Stdcall": "stdcall", "Fastcall": "fastcall",
                    "Aapcs": "aapcs", "Win64": "win64", "SysV64": "sysv64",
                    "System": "system"}.get(k, k)
            if isinstance(v, dict) and v.get("unwind"):
                name += "-unwind"
            return f'extern "{name}" '
        raise ApiError(f"unknown ABI {abi!r}")

    def header(self, h):
        return (("const " if h.get("is_const") else "")
                + ("async " if h.get("is_async") else "")
                + ("unsafe " if h.get("is_unsafe") else "")
                + self.abi(h["abi"]))

    # ---- generics ----------------------------------------------------------

    def generic_param(self, p):
        (k, v), = p["kind"].items()
        if k == "lifetime":
            return None
        if k == "type":
            if v.get("is_synthetic"):
                return None
            out = p["name"]
            b = self.bounds(v["bounds"])
            if b:
                out += ": " + b
            if v.get("default") is not None:
                out += " = " + self.ty(v["default"])
            return out
        if k == "const":
            out = "const " + p["name"] + ": " + self.ty(v["type"])
            if v.get("default") is not None:
                out += " = " + v["default"]
            return out
        raise ApiError(f"unknown generic parameter kind {k!r}")

    def generic_params(self, generics):
        kept = [x for x in (self.generic_param(p) for p in generics["params"]) if x]
        return "<" + ", ".join(kept) + ">" if kept else ""

    def where_clause(self, generics):
        preds = []
        for w in generics["where_predicates"]:
            (k, v), = w.items()
            if k == "bound_predicate":
                b = self.bounds(v["bounds"])
                if b:
                    preds.append(self.hrtb(v.get("generic_params", [])) + self.ty(v["type"]) + ": " + b)
            elif k == "lifetime_predicate":
                continue
            elif k == "eq_predicate":
                preds.append(self.ty(v["lhs"]) + " = " + self.term(v["rhs"]))
            else:
                raise ApiError(f"unknown where predicate {k!r}")
        return " where " + ", ".join(preds) if preds else ""

    # ---- items -------------------------------------------------------------

    @staticmethod
    def marks(item):
        out = ""
        if item.get("deprecation") is not None:
            out += "#[deprecated] "
        if "non_exhaustive" in item.get("attrs", []):
            out += "#[non_exhaustive] "
        return out

    def emit(self, group, rank, key, text):
        self.lines.append((group, rank, key, text))

    def signature(self, item, qualified_name):
        f = item["inner"]["function"]
        ins = []
        for name, t in f["sig"]["inputs"]:
            if name == "self":
                if t == {"generic": "Self"}:
                    ins.append("self")
                    continue
                (k, v), = t.items()
                if k == "borrowed_ref" and v["type"] == {"generic": "Self"}:
                    ins.append(self.ty(t)[: -len("Self")] + "self")
                    continue
                ins.append("self: " + self.ty(t))
            else:
                ins.append(f"{name}: {self.ty(t)}")
        if f["sig"].get("is_c_variadic"):
            ins.append("...")
        out = self.header(f["header"]) + "fn " + qualified_name + self.generic_params(f["generics"])
        out += "(" + ", ".join(ins) + ")"
        if f["sig"].get("output") is not None:
            out += " -> " + self.ty(f["sig"]["output"])
        return out + self.where_clause(f["generics"])

    def header_line(self, item, path):
        """The declaration line of a named item at `path` (a string)."""
        kind = kind_of(item)
        inner = item["inner"][kind]
        marks = self.marks(item)
        if kind == "module":
            return f"pub mod {path}"
        if kind in ("struct", "union"):
            out = f"{marks}pub {kind} {path}{self.generic_params(inner['generics'])}"
            if kind == "struct":
                sk = inner["kind"]
                if sk == "unit":
                    pass
                elif "tuple" in sk:
                    out += self.tuple_fields(sk["tuple"])
                elif sk["plain"]["has_stripped_fields"]:
                    out += " { .. }"
            elif inner["has_stripped_fields"]:
                out += " { .. }"
            return out + self.where_clause(inner["generics"])
        if kind == "enum":
            out = f"{marks}pub enum {path}{self.generic_params(inner['generics'])}"
            out += self.where_clause(inner["generics"])
            if inner["has_stripped_variants"]:
                out += " (some variants hidden)"
            return out
        if kind == "trait":
            out = marks + "pub "
            if inner["is_unsafe"]:
                out += "unsafe "
            if inner["is_auto"]:
                out += "auto "
            out += f"trait {path}{self.generic_params(inner['generics'])}"
            b = self.bounds(inner["bounds"])
            if b:
                out += ": " + b
            return out + self.where_clause(inner["generics"])
        if kind == "trait_alias":
            return (f"{marks}pub trait {path}{self.generic_params(inner['generics'])} = "
                    f"{self.bounds(inner['params'])}{self.where_clause(inner['generics'])}")
        if kind == "function":
            return marks + "pub " + self.signature(item, path)
        if kind == "constant":
            return f"{marks}pub const {path}: {self.ty(inner['type'])} = {inner['const']['expr']}"
        if kind == "static":
            mut = "mut " if inner["is_mutable"] else ""
            unsafe = "unsafe " if inner.get("is_unsafe") else ""
            return f"{marks}pub {unsafe}static {mut}{path}: {self.ty(inner['type'])}"
        if kind == "type_alias":
            return (f"{marks}pub type {path}{self.generic_params(inner['generics'])} = "
                    f"{self.ty(inner['type'])}{self.where_clause(inner['generics'])}")
        if kind == "macro":
            return f"{marks}pub macro {path}!"
        if kind == "proc_macro":
            mk = inner["kind"]
            if mk == "bang":
                return f"{marks}pub macro {path}!"
            if mk == "attr":
                return f"{marks}pub macro #[{path}]"
            helpers = ", ".join(inner.get("helpers", []))
            return f"{marks}pub macro #[derive({path})]" + (f" (helpers: {helpers})" if helpers else "")
        if kind == "extern_type":
            return f"{marks}pub type {path} (extern)"
        if kind == "extern_crate":
            return f"pub extern crate {path}"
        if kind == "primitive":
            return f"pub primitive {path}"
        raise ApiError(f"unknown item kind {kind!r} ({path})")

    def tuple_fields(self, ids):
        parts = []
        for fid in ids:
            field = self.c.item(fid) if fid is not None else None
            if field is None:
                parts.append("_")  # a private or hidden field
            else:
                parts.append("pub " + self.ty(field["inner"]["struct_field"]))
        return "(" + ", ".join(parts) + ")"

    def field_lines(self, group, owner, ids):
        for fid in ids:
            field = self.c.item(fid)
            if field is None:
                continue
            text = f"{self.marks(field)}pub {owner}::{field['name']}: {self.ty(field['inner']['struct_field'])}"
            self.emit(group, 1, field["name"], text)

    def variant_lines(self, group, owner, ids):
        for vid in ids:
            var = self.c.item(vid)
            if var is None:
                continue
            v = var["inner"]["variant"]
            name = f"{owner}::{var['name']}"
            text = f"{self.marks(var)}pub {name}"
            vk = v["kind"]
            if vk == "plain":
                pass
            elif "tuple" in vk:
                text += self.tuple_fields(vk["tuple"])
            elif vk["struct"]["has_stripped_fields"]:
                text += " { .. }"  # its fields (listed below) are not all shown
            if v.get("discriminant") is not None:
                text += " = " + v["discriminant"]["expr"]
            self.emit(group, 1, var["name"], text)
            if isinstance(vk, dict) and "struct" in vk:
                for fid in vk["struct"]["fields"]:
                    field = self.c.item(fid)
                    if field is None:
                        continue
                    self.emit(group, 1, var["name"] + "::" + field["name"],
                              f"{self.marks(field)}pub {name}::{field['name']}: "
                              f"{self.ty(field['inner']['struct_field'])}")

    def assoc_line(self, item, owner, in_trait):
        kind = kind_of(item)
        inner = item["inner"][kind]
        marks = self.marks(item)
        name = f"{owner}::{item['name']}"
        if kind == "function":
            text = marks + "pub " + self.signature(item, name)
            if in_trait and inner["has_body"]:
                text += " (provided)"
            return text
        if kind == "assoc_const":
            text = f"{marks}pub const {name}: {self.ty(inner['type'])}"
            if inner.get("value") is not None:
                text += " = " + inner["value"]
            return text
        if kind == "assoc_type":
            text = f"{marks}pub type {name}{self.generic_params(inner['generics'])}"
            b = self.bounds(inner["bounds"])
            if b:
                text += ": " + b
            text += self.where_clause(inner["generics"])
            if inner.get("type") is not None:
                text += " = " + self.ty(inner["type"])
            return text
        raise ApiError(f"unknown associated item kind {kind!r} ({name})")

    def impl_line(self, impl):
        # rustdoc leaves `is_unsafe` false on `unsafe impl`s (format 57), so
        # also go by the trait, when its definition is in the JSON.
        trait = self.c.item(impl["trait"]["id"])
        unsafe = impl["is_unsafe"] or (
            not impl["is_negative"] and trait is not None and kind_of(trait) == "trait"
            and trait["inner"]["trait"]["is_unsafe"])
        out = "unsafe impl" if unsafe else "impl"
        out += self.generic_params(impl["generics"]) + " "
        if impl["is_negative"]:
            out += "!"
        out += self.path(impl["trait"]) + " for " + self.ty(impl["for"])
        return out + self.where_clause(impl["generics"])

    def inherent_impl(self, group, impl):
        owner = self.ty(impl["for"])
        params = self.generic_params(impl["generics"])
        where = self.where_clause(impl["generics"])
        if params or where:
            # The impl's generics and bounds are part of its methods' signatures.
            self.emit(group, 2, "", f"impl{params} {owner}{where}")
        for iid in impl["items"]:
            item = self.c.item(iid)
            if item is None or item["visibility"] != "public":
                continue
            self.emit(group, 2, item["name"], self.assoc_line(item, owner, False))

    def run(self):
        c = self.c
        impls = set()
        for id_, paths in c.public_paths.items():
            item = c.item(id_)
            if item is None:
                continue
            canonical = c.canonical(id_)
            for path in paths:
                self.emit(path, 0, "", self.header_line(item, "::".join(path)))
            group = canonical
            owner = "::".join(canonical)
            kind = kind_of(item)
            inner = item["inner"][kind]
            if kind == "struct":
                sk = inner["kind"]
                if isinstance(sk, dict) and "plain" in sk:
                    self.field_lines(group, owner, sk["plain"]["fields"])
            elif kind == "union":
                self.field_lines(group, owner, inner["fields"])
            elif kind == "enum":
                self.variant_lines(group, owner, inner["variants"])
            elif kind == "trait":
                for iid in inner["items"]:
                    assoc = c.item(iid)
                    if assoc is not None:
                        self.emit(group, 2, assoc["name"], self.assoc_line(assoc, owner, True))
                impls.update(inner["implementations"])
            if kind in ("struct", "union", "enum"):
                for iid in inner["impls"]:
                    impl = c.item(iid)
                    if impl is not None and impl["inner"]["impl"]["trait"] is None:
                        self.inherent_impl(group, impl["inner"]["impl"])
                    else:
                        impls.add(iid)
        # Trait impls written in this crate, wherever they are listed (also
        # impls of other crates' traits for other crates' types).
        for item in c.index.values():
            if item["crate_id"] == 0 and kind_of(item) == "impl":
                impls.add(item["id"])
        for iid in impls:
            item = c.item(iid)
            if item is None:
                continue
            impl = item["inner"]["impl"]
            if impl["trait"] is None or impl["blanket_impl"] is not None or impl["is_synthetic"]:
                continue
            if self.private_ids([impl["for"], impl["trait"]], []):
                continue  # an impl for or of an item that is not public
            locals_ = self.local_ids(impl["for"], []) or self.local_ids(impl["trait"], [])
            group = c.canonical(locals_[0]) if locals_ else (c.name, "~")
            self.emit(group, 3, "", self.marks(item) + self.impl_line(impl))
        for path, id_, source in c.foreign_reexports:
            summary = c.paths.get(str(id_)) if id_ is not None else None
            kind = KIND_KEYWORD.get(summary["kind"], summary["kind"]) + " " if summary else ""
            self.emit(path, 0, "", f"pub use {kind}{'::'.join(path)} = {source.lstrip(':')}")

        def sort_key(line):
            group, rank, key, text = line
            return (group, rank, key, text)

        seen = set()
        out = []
        for line in sorted(self.lines, key=sort_key):
            if line[3] not in seen:
                seen.add(line[3])
                out.append(line[3])
        return out


def main(argv):
    parser = argparse.ArgumentParser(
        description="Print a crate's public API from rustdoc JSON, one item per line.")
    parser.add_argument("json", help="rustdoc JSON of the crate (target/doc/<crate>.json)")
    parser.add_argument(
        "--extern", dest="externs", action="append", default=[], metavar="JSON",
        help="rustdoc JSON of a dependency, to write its items by their public path "
             "(repeatable)")
    args = parser.parse_args(argv)
    try:
        crate = Crate(load(args.json))
        externs = [Crate(load(p)) for p in args.externs]
        lines = Lister(crate, externs).run()
    except ApiError as e:
        print(f"public_api.py: {e}", file=sys.stderr)
        return 2
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        # A JSON shape the script does not expect: never print a partial listing.
        print(f"public_api.py: unexpected rustdoc JSON ({type(e).__name__}: {e}); "
              f"scripts/public_api.py is out of step with the JSON format", file=sys.stderr)
        return 2
    sys.stdout.write("".join(line + "\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
