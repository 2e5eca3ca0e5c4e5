"""Pages the code generates at build time (mkdocs-gen-files): nothing here is kept by hand.

- reference/cli.md: every command's --help, from app.cli's parser;
- reference/settings.md: the IMGSIM_* variables, from app.settings.Settings' fields;
- reference/http.md: every route, from the app's own OpenAPI schema;
- benchmarks/*.md: the benchmark results, copied from the repository's benchmarks/ folder.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import mkdocs_gen_files

from app.cli import build_parser
from app.main import create_app
from app.settings import Settings

ROOT = Path(__file__).parent.parent


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse offers no public way to list sub-parsers
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help(parser: argparse.ArgumentParser) -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal's width
    return parser.format_help()


def cli_page() -> str:
    """The top-level help and each sub-command's, as argparse prints them."""
    parser = build_parser()
    lines = ["# Command line reference", "", "Generated from `imgsim --help`.", ""]
    lines += ["```text", _help(parser).rstrip(), "```", ""]
    for name, sub in _subcommands(parser).items():
        lines += [f"## imgsim {name}", "", "```text", _help(sub).rstrip(), "```", ""]
        for nested, subsub in _subcommands(sub).items():
            lines += [f"### imgsim {name} {nested}", "", "```text", _help(subsub).rstrip(), "```"]
            lines.append("")
    return "\n".join(lines)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def settings_page() -> str:
    """One row per Settings field: its variable, default and description."""
    prefix = Settings.model_config.get("env_prefix", "")
    lines = [
        "# Settings reference",
        "",
        "The service reads these `IMGSIM_*` environment variables once at start "
        "(`app/settings.py`); `imgsim serve`'s options set some of them. "
        "Generated from the settings class.",
        "",
        "| variable | default | what it sets |",
        "|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        if field.default_factory is not None:
            default = f"computed: `{field.default_factory.__name__}()`"
        else:
            default = f"`{field.default}`" if field.default is not None else "none"
        variable = f"`{prefix}{name.upper()}`"
        lines.append(f"| {variable} | {_cell(default)} | {_cell(field.description or '')} |")
    return "\n".join(lines) + "\n"


def _schema_name(schema: dict) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " or ".join(_schema_name(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"list of {_schema_name(schema.get('items', {}))}"
    return schema.get("type", "object")


def _parameters(operation: dict) -> list[str]:
    rows = []
    for param in operation.get("parameters", []):
        schema = param.get("schema", {})
        default = schema.get("default")
        rows.append(
            f"| `{param['name']}` | {param['in']} | {_schema_name(schema)} "
            f"| {'' if default is None else f'`{default}`'} "
            f"| {_cell(param.get('description', schema.get('description', '')))} |"
        )
    return ["| parameter | in | type | default | meaning |", "|---|---|---|---|---|", *rows]


def _body(operation: dict, components: dict) -> list[str]:
    content = operation.get("requestBody", {}).get("content", {})
    lines = []
    for media, spec in content.items():
        schema = spec.get("schema", {})
        name = _schema_name(schema)
        fields = components.get(name, {}).get("properties", {})
        lines.append(
            f"Body: `{media}`" + (": " + ", ".join(f"`{f}`" for f in fields) if fields else "")
        )
    return lines


def http_page() -> tuple[str, str]:
    """Each route of the OpenAPI schema (summary, parameters, body, answers), and the schema."""
    schema = create_app(Settings()).openapi()
    components = schema.get("components", {}).get("schemas", {})
    lines = [
        "# HTTP API reference",
        "",
        f"{schema['info']['title']} {schema['info']['version']}. Generated from the app's "
        "OpenAPI schema, which a running server also serves at `/openapi.json` "
        "(interactive at `/docs`). The schema itself: [openapi.json](openapi.json).",
        "",
    ]
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            lines += [f"## {method.upper()} `{path}`", ""]
            if operation.get("description") or operation.get("summary"):
                lines += [operation.get("description") or operation["summary"], ""]
            if operation.get("parameters"):
                lines += [*_parameters(operation), ""]
            body = _body(operation, components)
            if body:
                lines += [*body, ""]
            lines += [_answers(operation.get("responses", {})), ""]
    lines += ["## Schemas", ""]
    for name, component in components.items():
        lines += [f"### {name}", "", component.get("description", ""), ""]
        fields = component.get("properties", {})
        if fields:
            lines += ["| field | type | meaning |", "|---|---|---|"]
            for field, spec in fields.items():
                meaning = _cell(spec.get("description", ""))
                lines.append(f"| `{field}` | {_cell(_schema_name(spec))} | {meaning} |")
            lines.append("")
    return "\n".join(lines), json.dumps(schema, indent=1)


def _answers(responses: dict) -> str:
    """The status codes, each with the schema of its JSON body where it has one."""
    answers = []
    for code, spec in responses.items():
        body = spec.get("content", {}).get("application/json", {}).get("schema")
        shape = f" ({_link(body)})" if body and "$ref" in body else ""
        answers.append(f"**{code}** {_cell(spec.get('description', ''))}{shape}")
    return "Answers: " + ", ".join(answers)


def _link(schema: dict) -> str:
    name = _schema_name(schema)
    return f"[{name}](#{name.lower()})"


def main() -> None:
    with mkdocs_gen_files.open("reference/cli.md", "w") as out:
        out.write(cli_page())
    with mkdocs_gen_files.open("reference/settings.md", "w") as out:
        out.write(settings_page())
    page, schema = http_page()
    with mkdocs_gen_files.open("reference/http.md", "w") as out:
        out.write(page)
    with mkdocs_gen_files.open("reference/openapi.json", "w") as out:
        out.write(schema)
    for result in sorted((ROOT / "benchmarks").glob("*.md")):
        with mkdocs_gen_files.open(f"benchmarks/{result.name}", "w") as out:
            out.write(result.read_text())


main()
