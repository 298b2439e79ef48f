"""Compile the JSON Schema of the OCSF classes Custody emits from a tagged ocsf/ocsf-schema release.

Nothing here is a schema written by hand: the release's dictionary.json, objects/ and events/ are compiled by
ocsf-lib (the OCSF project's own Python compiler, `python -m ocsf.compile`), and each compiled class is turned
into JSON Schema by the rules of the OCSF server's JSON Schema export (ocsf-server, Schema.JsonSchema):

* a class or object is `{"type": "object", "properties": …, "additionalProperties": false}`;
* `required` lists the attributes whose requirement is `required`; a `just_one` constraint becomes `oneOf`,
  an `at_least_one` constraint `anyOf` (those attributes are then not in `required`);
* an attribute's type is its base type (string_t, integer_t, long_t → integer, float_t → number, boolean_t;
  derived types such as timestamp_t, ip_t, email_t by their base), json_t is any value, an object type is a
  `$ref` to `#/$defs/<object>`, `is_array` makes it an array of that;
* an enumerated integer or string attribute (`*_id`, …) carries `enum` (`const` when there is one value);
* attributes of profiles not selected are left out (the export's `profiles` parameter); an object that
  ends up with no properties allows any.

One correction: ocsf-lib 0.10.4 gives an object the `constraints` of the object it extends even where the object
defines its own (network_endpoint would inherit _entity's at_least_one [name, uid] instead of its own
[ip, uid, name, hostname, …]); as in the OCSF server, the nearest definition in the `extends` chain wins, read
from the release's objects/ and events/ files.

Steps (what produced tests/ocsf/<version>/, recorded in its SOURCE.json):

    git clone https://github.com/ocsf/ocsf-schema && git -C ocsf-schema checkout 1.8.0
    pip install ocsf-lib==0.10.4
    python tests/ocsf/compile.py ocsf-schema            # writes tests/ocsf/1.8.0/
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from ocsf.compile import Compilation, CompilationOptions
from ocsf.repository import read_repo
from ocsf.schema import to_dict

CLASSES = ("authentication", "detection_finding", "datastore_activity", "ssh_activity", "http_activity",
           "api_activity")
PROFILES = ("host", "security_control")
"""The profiles Custody's documents declare in metadata.profiles."""

BASE = {"string_t": "string", "integer_t": "integer", "long_t": "integer", "float_t": "number",
        "boolean_t": "boolean"}


def _base_type(types: dict, name: str) -> str | None:
    seen = name
    while seen not in BASE:
        parent = (types.get(seen) or {}).get("type")
        if parent is None:
            return None  # json_t: any value
        seen = parent
    return BASE[seen]


def _attribute(schema: dict, attr: dict, objects_used: set[str]) -> dict:
    types, objects = schema["types"], schema["objects"]
    kind = attr.get("object_type") or attr["type"]
    out: dict = {"title": attr.get("caption")}
    if kind in objects:
        out["$ref"] = f"#/$defs/{kind}"
        objects_used.add(kind)
    elif kind == "object_t":  # `unmapped` and the like: any object
        out["type"] = "object"
    else:
        base = _base_type(types, kind)
        if base is not None:
            out["type"] = base
        if attr.get("enum") and base in ("integer", "string"):
            values = sorted(int(k) if base == "integer" else k for k in attr["enum"])
            if len(values) == 1:
                out["const"] = values[0]
            else:
                out["enum"] = values
    if attr.get("is_array"):
        items = {k: out.pop(k) for k in ("$ref", "type", "enum", "const") if k in out}
        out["type"], out["items"] = "array", items
    return out


def _raw_constraints(repo: str) -> dict[str, dict]:
    """Each object's and class's `constraints` as the release defines them, inherited along `extends`."""
    raw = {}
    for path in [*Path(repo, "objects").glob("*.json"), *Path(repo, "events").rglob("*.json")]:
        item = json.loads(path.read_text())
        raw[item.get("name") or path.stem] = item
    def resolve(name: str, depth: int = 0) -> dict:
        item = raw.get(name) or {}
        if "constraints" in item or depth > 20:
            return item.get("constraints") or {}
        parent = item.get("extends")
        return resolve(parent, depth + 1) if parent and parent != name else {}
    return {name: resolve(name) for name in raw}


CONSTRAINTS: dict[str, dict] = {}


def _record(schema: dict, item: dict, objects_used: set[str]) -> dict:
    constraints = CONSTRAINTS.get(item["name"], item.get("constraints")) or {}
    just_one, at_least_one = constraints.get("just_one") or [], constraints.get("at_least_one") or []
    properties, required = {}, []
    for name, attr in sorted(item["attributes"].items()):
        if attr.get("profile") and attr["profile"] not in PROFILES:
            continue
        properties[name] = _attribute(schema, attr, objects_used)
        if attr.get("requirement") == "required" and name not in just_one and name not in at_least_one:
            required.append(name)
    out: dict = {"title": item.get("caption"), "type": "object", "properties": properties,
                 "additionalProperties": not properties}
    if required:
        out["required"] = sorted(required)
    present = [n for n in just_one if n in properties]
    if present:
        out["oneOf"] = [{"required": [n], "not": {"required": [o for o in present if o != n]}} for n in present]
    present = [n for n in at_least_one if n in properties]
    if present:
        out["anyOf"] = [{"required": [n]} for n in present]
    return out


def class_schema(schema: dict, name: str) -> dict:
    item = schema["classes"][name]
    used: set[str] = set()
    out = {"$schema": "https://json-schema.org/draft/2020-12/schema",
           "$id": f"https://schema.ocsf.io/{schema['version']}/classes/{name}", **_record(schema, item, used)}
    defs, done = {}, set()
    while used - done:
        obj = sorted(used - done)[0]
        done.add(obj)
        defs[obj] = _record(schema, schema["objects"][obj], used)
    out["$defs"] = dict(sorted(defs.items()))
    return out


def main(repo: str) -> None:
    options = CompilationOptions()
    options.set_object_types = True
    CONSTRAINTS.update(_raw_constraints(repo))
    compiled = to_dict(Compilation(read_repo(repo, preserve_raw_data=False), options).build())
    release = compiled["version"]
    target = Path(__file__).parent / release
    target.mkdir(exist_ok=True)
    for name in CLASSES:
        (target / f"{name}.schema.json").write_text(json.dumps(class_schema(compiled, name), indent=1) + "\n")
    git = lambda *args: subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True).stdout.strip()
    source = {"repository": "https://github.com/ocsf/ocsf-schema", "tag": git("describe", "--tags", "--exact-match"),
              "commit": git("rev-parse", "HEAD"), "version": release, "compiler": f"ocsf-lib {version('ocsf-lib')}",
              "classes": {n: compiled["classes"][n]["uid"] for n in CLASSES}, "profiles": list(PROFILES)}
    (target / "SOURCE.json").write_text(json.dumps(source, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
