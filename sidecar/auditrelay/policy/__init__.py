"""Audit policies: loading and validating an audit.k8s.io Policy, and evaluating it per request.

Both halves follow kube-apiserver (k8s.io/apiserver ``pkg/audit/policy``) to the letter:

* loading is ``reader.go``: apiVersion is required (``audit.k8s.io/v1``; the retired
  ``v1beta1`` is accepted here with a warning), kind must be Policy when given, decoding is
  strict first and falls back to a lenient decoding that ignores unknown fields with a warning
  (OpenShift ships a policy that relies on it), then ``validation.go`` runs and every problem
  is reported with its field path (``rules[3].level``), and a policy without rules is refused;
* evaluation is ``checker.go``: rules in order, the first that matches decides; rule
  ``omitStages`` are joined with the policy's; ``omitManagedFields`` of a rule overrides the
  policy's; no match means level None.

The package is split by concern: ``model`` (the types), ``loading`` (reading and validation),
``evaluation`` (deciding per request). ``compile_policy`` turns a loaded ``Policy`` into a ``CompiledPolicy`` whose ``decide`` costs a
dictionary lookup for the repetitive requests that make up audit traffic: a small bounded
cache is keyed by the request attributes, reduced to what the policy's rules can tell apart.
"""

from auditrelay.policy.evaluation import (
    CacheStats,
    CompiledPolicy,
    compile_policy,
    load_compiled,
)
from auditrelay.policy.loading import load_policy, parse_policy
from auditrelay.policy.model import (
    API_VERSION_V1,
    API_VERSION_V1BETA1,
    DEFAULT_CACHE_SIZE,
    KIND,
    STAGES,
    Decision,
    GroupResources,
    Level,
    Policy,
    PolicyRule,
    RequestAttributes,
)

__all__ = [
    "API_VERSION_V1",
    "API_VERSION_V1BETA1",
    "DEFAULT_CACHE_SIZE",
    "KIND",
    "STAGES",
    "CacheStats",
    "CompiledPolicy",
    "Decision",
    "GroupResources",
    "Level",
    "Policy",
    "PolicyRule",
    "RequestAttributes",
    "compile_policy",
    "load_compiled",
    "load_policy",
    "parse_policy",
]
