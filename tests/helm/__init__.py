"""Tests of the Helm chart (helm/auditrelay), rendered by the real helm."""
