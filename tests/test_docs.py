"""The docs stay in step with the code."""

from pathlib import Path

from pydantic import BaseModel

from regrow.config import RunConfig

ROOT = Path(__file__).parents[1]


def config_keys(model=RunConfig, prefix=""):
    for name, field in model.model_fields.items():
        candidates = [field.annotation, *getattr(field.annotation, "__args__", ())]
        sub = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if sub is not None:
            yield from config_keys(sub, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def test_every_recipe_key_is_documented():
    text = (ROOT / "docs" / "recipes.md").read_text()
    missing = [key for key in config_keys() if f"`{key}`" not in text]
    assert not missing, f"docs/recipes.md lacks: {missing}"


def test_readme_names_the_built_in_recipes_and_set_up_commands():
    from regrow.config import builtin_recipes

    readme = (ROOT / "README.md").read_text()
    for name in builtin_recipes():
        assert f"`{name}`" in readme
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_signatures_match_the_code():
    """Every parameter the README's API section writes as ``name=default`` exists with that default."""
    import ast
    import inspect
    import re

    import regrow

    readme = (ROOT / "README.md").read_text()
    checked = 0
    for name, params in re.findall(r"\*\*`regrow\.(\w+)\(([^`]*)\)[^`]*`\*\*", readme):
        signature = inspect.signature(getattr(regrow, name))
        call = ast.parse(f"f({params.replace('*, ', '').replace(', ...', '')})").body[0].value
        for keyword in call.keywords:
            assert keyword.arg in signature.parameters, f"README: regrow.{name} has no parameter {keyword.arg!r}"
            expected = signature.parameters[keyword.arg].default
            assert ast.literal_eval(keyword.value) == expected, f"README: regrow.{name}({keyword.arg}=) is {expected!r}"
            checked += 1
        for arg in call.args:
            assert arg.id in signature.parameters, f"README: regrow.{name} has no parameter {arg.id!r}"
    assert checked >= 20


def test_recipes_md_lists_the_refused_combinations_the_code_applies():
    import re

    from regrow.config.checks import RULES, rules_markdown

    text = (ROOT / "docs" / "recipes.md").read_text()
    block = re.search(r"<!-- rules: regrow.config.checks.rules_markdown\(\) -->\n(.*?)<!-- /rules -->", text, re.S)
    assert block is not None, "docs/recipes.md lost its rules block"
    assert block.group(1) == rules_markdown()
    assert len(RULES) >= 15
