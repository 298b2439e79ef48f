"""Policy on operations: protocol, kind, objects, text and attribute matchers; analyzers; `policy test` for any protocol."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from custody.commands.policy import policy_group
from proxy.policy import analyzers
from proxy.policy.analyzers import Part
from proxy.policy.operation import Operation
from proxy.policy.rules import Policy, PolicyError

DEFAULT_POLICY = Path(__file__).resolve().parents[1] / "proxy" / "policies" / "default.toml"

POLICY = r"""
[[rule]]
name = "block-ssh-rm-rf"
action = "block"
message = "recursive rm is not allowed"
protocols = ["ssh"]
operations = ["command"]
text = '\brm\s+(-\S+\s+)*(-[a-zA-Z]*[rR]|--recursive)'

[[rule]]
name = "hold-secret-deletes"
action = "hold"
protocols = ["kubernetes"]
attributes = { verb = ["delete", "deletecollection"], resource = ["secrets"] }
approvers = ["sre"]

[[rule]]
name = "block-etc-transfers"
action = "block"
operations = ["transfer"]
objects = ["/etc/*"]

[[rule]]
name = "block-prod-forwards"
action = "block"
protocols = ["ssh"]
operations = ["forward"]
attributes = { host = ["prod-*", "*.prod.internal"] }

[[rule]]
name = "dba-truncates"
action = "allow"
groups = ["dba"]
protocols = ["postgres"]
statements = ["truncate"]

[[rule]]
name = "no-postgres-deletes"
action = "block"
statements = ["delete", "truncate"]

[[rule]]
name = "hold-postgres-grants"
action = "hold"
protocols = ["postgres"]
statements = ["grant"]
approvers = ["dba"]

[[rule]]
name = "mysql-read-only"
action = "block"
protocols = ["mysql"]
text = '(?i)^\s*(insert|update|delete|replace)\b'
"""


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy.from_toml(POLICY, "ops.toml")


def decide(policy: Policy, operation: Operation, groups=("dev",)):
    return policy.decide("alice", groups, "target-1", operation)


def ssh(command: str) -> Operation:
    return Operation("ssh", "command", command, attributes={"user": "root"})


def kube(verb: str, resource: str, path: str) -> Operation:
    method = {"delete": "DELETE", "deletecollection": "DELETE", "get": "GET", "list": "GET"}[verb]
    return Operation("kubernetes", "request", f"{method} {path}", objects=(path.rsplit("/", 1)[-1],),
                     attributes={"verb": verb, "resource": resource, "namespace": "x"})


# --- decided on the operation's own fields: no analyzer for ssh or kubernetes -------------------

def test_the_ssh_analyzer_reads_a_command_line_with_shell_quoting_into_its_simple_commands():
    found = analyzers.parts(ssh("""sudo 'rm' "-rf" / ; X=1 ls /tmp > /tmp/out && bash -c 'cat $(echo /etc/shadow)'"""))
    assert found[0] == Part()  # the line as sent
    texts = [(p.operation.text, p.operation.objects, p.depth) for p in found[1:]]
    assert texts[:3] == [("rm -rf /", ("/",), 0), ("ls /tmp", ("/tmp", "/tmp/out"), 0),
                         ("bash -c 'cat $(echo /etc/shadow)'", ("cat $(echo /etc/shadow)",), 0)]
    assert ("echo /etc/shadow", ("/etc/shadow",), 2) in texts
    assert analyzers.parts(ssh("")) == (Part(),)
    with pytest.raises(analyzers.AnalysisError):
        analyzers.parts(ssh("echo 'unclosed"))


def test_a_quoted_or_wrapped_rm_rf_is_still_rm_rf(policy):
    assert decide(policy, ssh("sudo -u root env A=1 'rm' \"-rf\" /var/lib/x")).rule == "block-ssh-rm-rf"
    assert decide(policy, ssh("sh -c 'cd / && rm -rf var'")).rule == "block-ssh-rm-rf"


@pytest.mark.parametrize("command, action", [
    ("rm -rf /var/lib/postgresql", "block"),
    ("cd /tmp && rm -f -R build", "block"),
    ("rm --recursive x", "block"),
    ("rm -f core.1234", "allow"),
    ("ls -la /etc", "allow"),
    ("echo farm -rf", "allow"),
])
def test_ssh_rm_rf_by_text(policy, command, action):
    decision = decide(policy, ssh(command))
    assert decision.action == action
    assert decision.rule == ("block-ssh-rm-rf" if action == "block" else None)
    assert decision.statements == () and decision.matched is None


def test_the_protocol_and_kind_matchers_keep_a_rule_to_its_protocol(policy):
    assert decide(policy, Operation("http", "request", "POST /run?cmd=rm -rf /")).action == "allow"
    assert decide(policy, Operation("ssh", "transfer", "rm -rf notes.txt")).action == "allow"


@pytest.mark.parametrize("verb, resource, action", [
    ("delete", "secrets", "hold"),
    ("deletecollection", "secrets", "hold"),
    ("get", "secrets", "allow"),
    ("delete", "configmaps", "allow"),
])
def test_kubernetes_delete_on_secrets_by_attributes(policy, verb, resource, action):
    decision = decide(policy, kube(verb, resource, f"/api/v1/namespaces/x/{resource}/y"))
    assert (decision.action, decision.approvers) == (action, ("sre",) if action == "hold" else ())


def test_every_attribute_named_must_be_present(policy):
    # Not a request line, so the Kubernetes analyzer cannot tell the resource: the rule needs one.
    no_resource = Operation("kubernetes", "request", "delete the secret y", attributes={"verb": "delete"})
    assert decide(policy, no_resource).action == "allow"


def test_the_kubernetes_analyzer_reads_verb_and_resource_off_the_request_line(policy):
    # As the API server's RequestInfo does: what the front end did not set is read from the path.
    bare = Operation("kubernetes", "request", "DELETE /api/v1/namespaces/x/secrets/y")
    assert decide(policy, bare).action == "hold"
    assert decide(policy, Operation("kubernetes", "request", "DELETE /api/v1/namespaces/x/secrets")).action == "hold"
    assert decide(policy, Operation("kubernetes", "request", "GET /api/v1/namespaces/x/secrets/y")).action == "allow"


def test_objects_match_shell_patterns_any_of_them(policy):
    transfer = Operation("ssh", "transfer", "scp", objects=("/home/alice/a", "/etc/shadow"))
    assert decide(policy, transfer).rule == "block-etc-transfers"
    assert decide(policy, Operation("ssh", "transfer", "scp", objects=("/home/etc/x",))).action == "allow"
    assert decide(policy, Operation("ssh", "transfer", "scp")).action == "allow"  # no objects: no match


@pytest.mark.parametrize("host, action", [
    ("prod-db-1", "block"), ("db.prod.internal", "block"), ("staging-db", "allow"), ("PROD-db", "allow"),
])
def test_attribute_patterns_are_shell_patterns_compared_exactly(policy, host, action):
    forward = Operation("ssh", "forward", f"{host}:5432", attributes={"host": host, "port": "5432"})
    assert decide(policy, forward).action == action


def test_text_is_searched_not_anchored_and_flags_are_inline(policy):
    assert decide(policy, Operation("mysql", "statement", "  Insert into t values (1)")).rule == "mysql-read-only"
    assert decide(policy, Operation("mysql", "statement", "SELECT 'delete'")).action == "allow"


# --- statement matchers read the analysis, and only the analysis ----------------------------------

def test_statement_matchers_never_match_an_operation_without_statement_analysis(policy):
    # "no-postgres-deletes" has only statement matchers and no protocols: it reads any protocol's SQL analysis,
    # MySQL's too (sqlglot), but never an operation that has none
    assert decide(policy, Operation("mysql", "statement", "TRUNCATE t")).rule == "no-postgres-deletes"
    assert decide(policy, Operation("ssh", "command", "DELETE FROM t")).action == "allow"
    assert decide(policy, Operation("postgres", "transfer", "DELETE FROM t")).action == "allow"  # only statements are SQL


def test_strictest_wins_across_the_analyzers_sub_statements(policy):
    sql = "GRANT ALL ON t TO bob; WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d"
    decision = decide(policy, Operation("postgres", "statement", sql))
    assert (decision.action, decision.rule, decision.matched.kind) == ("block", "no-postgres-deletes", "delete")
    assert [s.kind for s in decision.statements] == ["grant", "select"]  # top level; the DELETE is nested
    assert [p.statement.kind for p in decision.parts] == ["grant", "select", "delete"]
    assert decision.part.depth == 1
    # the exception for dba comes first for its statement, yet the other statement still decides
    both = decide(policy, Operation("postgres", "statement", "TRUNCATE a; GRANT ALL ON t TO bob"), groups=("dba",))
    assert (both.action, both.rule) == ("hold", "hold-postgres-grants")


def test_a_parse_error_still_meets_rules_on_the_operations_own_fields():
    policy = Policy.from_toml("""
on_parse_error = "allow"

[[rule]]
name = "ci-never-on-postgres"
action = "block"
subjects = ["ci-*"]
protocols = ["postgres"]
""")
    broken = Operation("postgres", "statement", "SELEC * FORM t")
    assert policy.decide("alice", [], "db", broken).rule == "on_parse_error"
    decision = policy.decide("ci-7", [], "db", broken)
    assert (decision.action, decision.rule) == ("block", "ci-never-on-postgres")


def test_an_empty_query_is_decided_on_its_fields():
    policy = Policy.from_toml("[[rule]]\nname = 'nothing-on-pg'\naction = 'block'\nprotocols = ['postgres']\n")
    assert policy.decide("a", [], "t", Operation("postgres", "statement", "-- nothing")).rule == "nothing-on-pg"


def test_an_analyzer_is_a_function_and_one_registry_line(monkeypatch, policy):
    def ssh_lists(operation: Operation) -> list[Part]:
        """A toy ssh analyzer: each command of a `;` list is a part with its own text and objects."""
        return [Part(operation=Operation("ssh", "command", c.strip(), tuple(c.split()[1:])))
                for c in operation.text.split(";")]

    monkeypatch.setitem(analyzers.ANALYZERS, "ssh", ssh_lists)
    policy = Policy.from_toml(POLICY + """
[[rule]]
name = "block-shadow"
action = "block"
protocols = ["ssh"]
objects = ["/etc/shadow"]
""")
    decision = decide(policy, ssh("ls /tmp; cat /etc/shadow"))
    assert (decision.action, decision.rule) == ("block", "block-shadow")
    assert decision.part.operation.text == "cat /etc/shadow"
    assert decide(policy, ssh("ls /tmp; cat /etc/hosts")).action == "allow"


def test_operation_is_immutable_and_attributes_are_copied():
    attributes = {"verb": "delete"}
    operation = Operation("kubernetes", "request", "DELETE /x", ["secrets"], attributes)
    attributes["verb"] = "get"
    assert operation.attributes["verb"] == "delete" and operation.objects == ("secrets",)
    with pytest.raises(TypeError):
        operation.attributes["verb"] = "get"  # type: ignore[index]
    assert operation == Operation("kubernetes", "request", "DELETE /x", ("secrets",), {"verb": "delete"})
    assert hash(operation) == hash(Operation("kubernetes", "request", "DELETE /x", ("secrets",)))


# --- the file ----------------------------------------------------------------------------------

@pytest.mark.parametrize("rule, message", [
    ("text = 'rm\\s+(-rf'", r"rule 'x': text: invalid regular expression /rm\\s\+\(-rf/: missing \), unterminated subpattern at position 5$"),
    ("text = ['rm']", r"rule 'x': text: expected a regular expression"),
    ("text = ''", r"rule 'x': text: expected a regular expression"),
    ("protocols = ['kubernets']", r"rule 'x': protocols: unknown name 'kubernets' \(did you mean 'kubernetes'\?\)"),
    ("operations = ['comand']", r"rule 'x': operations: unknown name 'comand' \(did you mean 'command'\?\)"),
    ("objects = '/etc/*'", r"rule 'x': objects: expected a list of non-empty strings"),
    ("attributes = ['verb']", r"rule 'x': attributes: expected a table of name = \[patterns\]"),
    ("attributes = { verb = 'delete' }", r"rule 'x': attributes.verb: expected a non-empty list of non-empty strings"),
    ("attributes = { verb = [] }", r"rule 'x': attributes.verb: expected a non-empty list"),
    ("protocol = ['ssh']", r"rule 'x': protocol: unknown key"),
])
def test_broken_operation_matchers_are_one_line_errors(rule, message):
    with pytest.raises(PolicyError, match=message) as error:
        Policy.from_toml(f"[[rule]]\nname = 'x'\naction = 'block'\n{rule}\n", "p.toml")
    assert str(error.value).startswith("p.toml: ") and "\n" not in str(error.value)


def test_a_multiline_regex_error_is_still_one_line():
    with pytest.raises(PolicyError) as error:
        Policy.from_toml("[[rule]]\nname = 'x'\naction = 'block'\ntext = '''(?x)\na\n(b'''\n", "p.toml")
    assert "text: invalid regular expression" in str(error.value) and "\n" not in str(error.value)


def test_the_default_policys_commented_examples_load_and_decide_as_described():
    text = DEFAULT_POLICY.read_text()
    examples = text[text.index("\n", text.index("# --- Other protocols")):text.index("# --- Masking")]
    uncommented = re.sub(r"(?m)^# ?", "", examples)
    policy = Policy.from_toml(text + "\n" + uncommented, "default+examples")
    assert policy.decide("eve", ["dev"], "web-1", ssh("sudo rm -rf /srv")).rule == "block-ssh-rm-rf"
    delete = kube("delete", "secrets", "/api/v1/namespaces/x/secrets/y")
    assert policy.decide("eve", ["dev"], "kube", delete).rule == "hold-kubernetes-secret-deletes"
    admin = Operation("http", "request", "POST /admin/users", attributes={"method": "POST"})
    assert policy.decide("eve", ["dev"], "web", admin).rule == "block-http-admin-writes"
    assert policy.decide("eve", ["ops"], "web", admin).action == "allow"
    assert policy.decide("eve", ["dev"], "local-postgres", Operation("postgres", "statement", "DROP TABLE t")).rule == "block-drop"


# --- custody policy test ---------------------------------------------------------------------------

def run(*args: str):
    result = CliRunner().invoke(policy_group, ["test", "--identity", "alice", "--group", "dev", *args])
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def test_policy_test_command_for_an_ssh_command(tmp_path):
    path = tmp_path / "ops.toml"
    path.write_text(POLICY)
    lines = run("--policy", str(path), "--target", "web-1", "--protocol", "ssh", "--attribute", "user=root",
                "rm -rf /var/lib")
    assert lines[:3] == ["decision: block", "rule: block-ssh-rm-rf", "message: recursive rm is not allowed"]
    assert "why: protocols: ssh" in lines and "why: operations: command" in lines
    assert any(line.startswith("why: text: /") and line.endswith("found 'rm -r'") for line in lines)
    assert "operation: ssh command: rm -rf /var/lib" in lines
    assert "  objects=-  attributes=user=root" in lines
    assert "statements:" not in lines


def test_policy_test_command_for_a_kubernetes_request_with_objects_and_attributes(tmp_path):
    path = tmp_path / "ops.toml"
    path.write_text(POLICY)
    lines = run("--policy", str(path), "--target", "kube", "--protocol", "kubernetes", "--object", "y",
                "--attribute", "verb=delete", "--attribute", "resource=secrets",
                "DELETE /api/v1/namespaces/x/secrets/y")
    assert lines[:2] == ["decision: hold", "rule: hold-secret-deletes"]
    assert "why: attributes: verb 'delete' matched 'delete'" in lines
    assert "why: attributes: resource 'secrets' matched 'secrets'" in lines
    assert "operation: kubernetes request: DELETE /api/v1/namespaces/x/secrets/y" in lines
    assert "  objects=y  attributes=verb=delete, resource=secrets" in lines


def test_policy_test_command_says_when_no_rule_matched_and_explains_sql_rules():
    lines = run("--policy", str(DEFAULT_POLICY), "--target", "web-1", "--protocol", "ssh", "--kind", "transfer", "x")
    assert lines[:3] == ["decision: allow", "rule: (no rule matched)", "why: no rule matched: allowed (and recorded)"]
    lines = run("--policy", str(DEFAULT_POLICY), "--target", "local-postgres", "DELETE FROM orders")
    assert "why: statements: delete" in lines and "why: without_where: the delete has no WHERE that filters" in lines


def test_policy_test_command_rejects_a_malformed_attribute():
    result = CliRunner().invoke(policy_group, ["test", "--policy", str(DEFAULT_POLICY), "--identity", "a",
                                               "--target", "t", "--protocol", "ssh", "--attribute", "user", "ls"])
    assert result.exit_code == 2 and "expected name=value, got 'user'" in result.output
