// Command kubecheck strictly decodes rendered Kubernetes manifests into the k8s.io/api types.
//
// It reads a multi-document YAML stream (the output of `helm template`) on stdin. Each document
// of a kind it knows is decoded with unknown fields and wrong types rejected, the way the API
// server's strict field validation rejects them. It prints one line per document, "checked
// <kind> <name>" or "skipped <apiVersion> <kind> <name>" for kinds outside k8s.io/api (a
// ServiceMonitor, an OpenShift SCC), and exits 1 with every problem found.
package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

// known maps "apiVersion kind" to a constructor of the typed object.
var known = map[string]func() any{
	"v1 ConfigMap":                             func() any { return &corev1.ConfigMap{} },
	"v1 Pod":                                   func() any { return &corev1.Pod{} },
	"v1 Secret":                                func() any { return &corev1.Secret{} },
	"v1 Service":                               func() any { return &corev1.Service{} },
	"v1 ServiceAccount":                        func() any { return &corev1.ServiceAccount{} },
	"apps/v1 DaemonSet":                        func() any { return &appsv1.DaemonSet{} },
	"apps/v1 Deployment":                       func() any { return &appsv1.Deployment{} },
	"policy/v1 PodDisruptionBudget":            func() any { return &policyv1.PodDisruptionBudget{} },
	"rbac.authorization.k8s.io/v1 Role":        func() any { return &rbacv1.Role{} },
	"rbac.authorization.k8s.io/v1 RoleBinding": func() any { return &rbacv1.RoleBinding{} },
}

type header struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name string `json:"name"`
	} `json:"metadata"`
}

// documents splits a YAML stream on its "---" separator lines.
func documents(stream io.Reader) ([][]byte, error) {
	var docs [][]byte
	var current bytes.Buffer
	scanner := bufio.NewScanner(stream)
	scanner.Buffer(make([]byte, 1<<20), 64<<20)
	for scanner.Scan() {
		line := scanner.Text()
		if strings.TrimRight(line, " ") == "---" {
			docs = append(docs, bytes.Clone(current.Bytes()))
			current.Reset()
			continue
		}
		current.WriteString(line)
		current.WriteByte('\n')
	}
	docs = append(docs, current.Bytes())
	return docs, scanner.Err()
}

func check(doc []byte) (string, error) {
	var head header
	if err := yaml.Unmarshal(doc, &head); err != nil {
		return "", fmt.Errorf("not YAML: %w", err)
	}
	if head.Kind == "" {
		return "", nil // an empty document (comments only)
	}
	name := head.Kind + " " + head.Metadata.Name
	newObject, ok := known[head.APIVersion+" "+head.Kind]
	if !ok {
		return "skipped " + head.APIVersion + " " + name, nil
	}
	asJSON, err := yaml.YAMLToJSON(doc)
	if err != nil {
		return "", fmt.Errorf("%s: %w", name, err)
	}
	// The API server's own strict decoding: case-sensitive names, no unknown or duplicate
	// fields, each error with the field's path.
	strict, err := kjson.UnmarshalStrict(asJSON, newObject(), kjson.DisallowUnknownFields, kjson.DisallowDuplicateFields)
	if err != nil {
		return "", fmt.Errorf("%s: %w", name, err)
	}
	if len(strict) > 0 {
		return "", fmt.Errorf("%s: %w", name, errors.Join(strict...))
	}
	return "checked " + name, nil
}

func main() {
	docs, err := documents(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, "kubecheck: reading stdin:", err)
		os.Exit(2)
	}
	var problems []error
	for _, doc := range docs {
		line, err := check(doc)
		if err != nil {
			problems = append(problems, err)
			continue
		}
		if line != "" {
			fmt.Println(line)
		}
	}
	if err := errors.Join(problems...); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
