import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    commands = re.findall(r"```bash\n(.+?)\n```", readme)
    assert "pip install . && diffused-heads generate" in commands[0], "the README opens with the main command"
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert commands[1].strip() in ci.splitlines(), "the README's second command is what .ci/run runs"
