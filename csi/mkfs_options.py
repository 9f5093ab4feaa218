"""mkfs options: the StorageClass parameter `mkfsOptions`, checked against a short list of known-safe options, and
the defaults that make a file system older worker kernels can mount.

xfsprogs 5.15 and later format with bigtime and inobtcount, which kernels before 5.10 cannot mount, and newer
ones (6.x) with nrext64 too, which kernels before 5.19 cannot mount: a volume formatted by the node plugin's image
would then not mount on a worker with an older kernel, or after being moved to one (the bug filed against
vsphere-csi, aws-ebs-csi, hcloud-csi and zfs-localpv). So xfs is made with those three off unless the class asks
for them. All three options exist from xfsprogs 5.19 on (Debian 12 ships 6.1.0, Debian 13 a later 6.x), and a
config file such as xfsprogs' own lts_5.4.conf cannot replace them: Debian 12's mkfs.xfs refuses its own copy.

The options never reach a shell: they are parsed here into (option, suboption, value) triples from a fixed
vocabulary and handed to the runner as argv items. They travel from CreateVolume to the node in the volume's
attributes (volume_context), and the node checks them again.
"""

from __future__ import annotations

from dataclasses import dataclass

from csi import errors

PARAM = "mkfsOptions"
MAX_LEN = 256
BOOL = ("0", "1")
# option -> suboption -> accepted values, for mkfs.xfs. Anything else is refused: no device or file names
# (-d name=, -p, -l logdev=), no -f (overwrite whatever is there), no labels or UUIDs (clones share them).
XFS_ALLOWED: dict[str, dict[str, tuple[str, ...]]] = {
    "-m": {"bigtime": BOOL, "inobtcount": BOOL, "finobt": BOOL, "reflink": BOOL, "rmapbt": BOOL},
    "-i": {"nrext64": BOOL, "sparse": BOOL, "size": ("256", "512", "1024", "2048")},
}
# What every xfs volume gets unless its class says otherwise: mountable by Linux 5.4 and later.
XFS_DEFAULTS: dict[str, dict[str, str]] = {"-m": {"bigtime": "0", "inobtcount": "0"}, "-i": {"nrext64": "0"}}


@dataclass(frozen=True)
class MkfsOptions:
    """Options of one class, in a canonical order: ((option, ((suboption, value), ...)), ...)."""
    options: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.options)

    def __str__(self) -> str:
        return " ".join(f"{opt} {','.join(f'{k}={v}' for k, v in subs)}" for opt, subs in self.options)


def _invalid(text: str, why: str) -> errors.CsiError:
    allowed = "; ".join(f"{opt} " + ",".join(f"{k}={'|'.join(v)}" for k, v in subs.items())
                        for opt, subs in XFS_ALLOWED.items())
    return errors.invalid(f"parameter {PARAM}={text[:MAX_LEN]!r}: {why}. Allowed (xfs only): {allowed}")


def parse(text: str) -> MkfsOptions:
    """mkfsOptions as a StorageClass or a volume_context gives it, e.g. "-m bigtime=1,inobtcount=1 -i size=512";
    empty means none. INVALID_ARGUMENT for anything outside XFS_ALLOWED or given twice."""
    if not text or not text.strip():
        return MkfsOptions()
    if len(text) > MAX_LEN or any(not c.isprintable() for c in text):
        raise _invalid(text, f"at most {MAX_LEN} printable characters")
    tokens = text.split()
    if len(tokens) % 2:
        raise _invalid(text, "expected pairs of an option and its suboptions, e.g. -m bigtime=0")
    chosen: dict[str, dict[str, str]] = {}
    for opt, value in zip(tokens[::2], tokens[1::2]):
        if opt not in XFS_ALLOWED:
            raise _invalid(text, f"option {opt[:20]!r} is not allowed")
        for item in value.split(","):
            key, sep, val = item.partition("=")
            if not sep or key not in XFS_ALLOWED[opt] or val not in XFS_ALLOWED[opt][key]:
                raise _invalid(text, f"{opt} {item[:40]!r} is not allowed")
            if key in chosen.get(opt, {}):
                raise _invalid(text, f"{opt} {key} is given twice")
            chosen.setdefault(opt, {})[key] = val
    if chosen.get("-m", {}).get("inobtcount") == "1" and chosen["-m"].get("finobt") == "0":
        raise _invalid(text, "inobtcount=1 needs finobt=1")
    return MkfsOptions(tuple((opt, tuple((k, chosen[opt][k]) for k in XFS_ALLOWED[opt] if k in chosen[opt]))
                             for opt in XFS_ALLOWED if opt in chosen))


def check_fs(options: MkfsOptions, fs: str) -> None:
    if options and fs != "xfs":
        raise errors.invalid(f"parameter {PARAM} applies to xfs only; this volume's file system is {fs!r}")


def mkfs_args(fs: str, options: MkfsOptions = MkfsOptions()) -> list[str]:
    """The argv items that go between mkfs.<fs> and the device: for xfs the defaults with the class's options
    over them, one -m and one -i (mkfs.xfs refuses a suboption given twice)."""
    check_fs(options, fs)
    if fs != "xfs":
        return []
    out: list[str] = []
    for opt in XFS_ALLOWED:
        merged = dict(XFS_DEFAULTS.get(opt, {}))
        merged.update(dict(dict(options.options).get(opt, ())))
        if merged:
            out += [opt, ",".join(f"{k}={merged[k]}" for k in XFS_ALLOWED[opt] if k in merged)]
    return out
