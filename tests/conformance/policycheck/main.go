// Command policycheck answers audit-policy questions with kube-apiserver's own code, so that
// auditrelay's Python port can be compared with it case by case.
//
// It reads JSON lines on stdin and writes one JSON line per input on stdout:
//
//	{"op":"load","id":"p1","policy":"<YAML text>"}
//	    -> {"ok":true,"rules":3,"warned":false}  or  {"ok":false,"error":"..."}
//	    loads the text with k8s.io/apiserver's policy loader (decoding and validation) and
//	    keeps the evaluator under the id.
//	{"op":"eval","id":"p1","request":{"user":"alice","groups":[...],"verb":"get",...}}
//	    -> {"level":"Metadata","omitStages":["RequestReceived"],"omitManagedFields":false,"rule":2}
//	    evaluates the request attributes with k8s.io/apiserver's policy checker. "rule" is the
//	    first rule that matches on its own (each rule checked alone, with its level set to
//	    Metadata, by the same checker), or null.
//
// A null or absent "user" is a request without an authenticated user.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"

	auditinternal "k8s.io/apiserver/pkg/apis/audit"
	"k8s.io/apiserver/pkg/audit"
	"k8s.io/apiserver/pkg/audit/policy"
	"k8s.io/apiserver/pkg/authentication/user"
	"k8s.io/apiserver/pkg/authorization/authorizer"
	"k8s.io/klog/v2"
)

type request struct {
	Op      string     `json:"op"`
	ID      string     `json:"id"`
	Policy  string     `json:"policy"`
	Request attributes `json:"request"`
}

type attributes struct {
	User            *string  `json:"user"`
	Groups          []string `json:"groups"`
	Verb            string   `json:"verb"`
	Namespace       string   `json:"namespace"`
	APIGroup        string   `json:"apiGroup"`
	Resource        string   `json:"resource"`
	Subresource     string   `json:"subresource"`
	Name            string   `json:"name"`
	Path            string   `json:"path"`
	ResourceRequest bool     `json:"resourceRequest"`
}

type loadAnswer struct {
	OK     bool   `json:"ok"`
	Rules  int    `json:"rules,omitempty"`
	Warned bool   `json:"warned,omitempty"`
	Error  string `json:"error,omitempty"`
}

type evalAnswer struct {
	Level             string   `json:"level"`
	OmitStages        []string `json:"omitStages"`
	OmitManagedFields bool     `json:"omitManagedFields"`
	Rule              *int     `json:"rule"`
	Error             string   `json:"error,omitempty"`
}

// loadedPolicy is a policy's evaluator, and one evaluator per rule to tell which rule matched.
type loadedPolicy struct {
	evaluator audit.PolicyRuleEvaluator
	rules     []audit.PolicyRuleEvaluator
}

func newLoadedPolicy(loaded *auditinternal.Policy) loadedPolicy {
	rules := make([]audit.PolicyRuleEvaluator, 0, len(loaded.Rules))
	for _, rule := range loaded.Rules {
		alone := rule.DeepCopy()
		alone.Level = auditinternal.LevelMetadata
		rules = append(rules, policy.NewPolicyRuleEvaluator(&auditinternal.Policy{Rules: []auditinternal.PolicyRule{*alone}}))
	}
	return loadedPolicy{evaluator: policy.NewPolicyRuleEvaluator(loaded), rules: rules}
}

func main() {
	var klogOutput bytes.Buffer
	flags := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(flags)
	_ = flags.Set("logtostderr", "false")
	_ = flags.Set("alsologtostderr", "false")
	klog.SetOutput(&klogOutput)

	evaluators := map[string]loadedPolicy{}
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 64<<20)
	out := bufio.NewWriter(os.Stdout)
	encoder := json.NewEncoder(out)

	for in.Scan() {
		var req request
		if err := json.Unmarshal(in.Bytes(), &req); err != nil {
			fmt.Fprintf(os.Stderr, "policycheck: bad input line: %v\n", err)
			os.Exit(2)
		}
		var answer any
		switch req.Op {
		case "load":
			klogOutput.Reset()
			loaded, err := policy.LoadPolicyFromBytes([]byte(req.Policy))
			klog.Flush()
			if err != nil {
				answer = loadAnswer{Error: err.Error()}
				break
			}
			warned := strings.Contains(klogOutput.String(), "falling back to lenient decoding")
			evaluators[req.ID] = newLoadedPolicy(loaded)
			answer = loadAnswer{OK: true, Rules: len(loaded.Rules), Warned: warned}
		case "eval":
			evaluator, ok := evaluators[req.ID]
			if !ok {
				answer = evalAnswer{Error: fmt.Sprintf("no policy loaded as %q", req.ID)}
				break
			}
			answer = evaluate(evaluator, req.Request)
		default:
			fmt.Fprintf(os.Stderr, "policycheck: unknown op %q\n", req.Op)
			os.Exit(2)
		}
		if err := encoder.Encode(answer); err != nil {
			fmt.Fprintf(os.Stderr, "policycheck: %v\n", err)
			os.Exit(1)
		}
		// Each answer goes out at once: the caller waits for it before asking the next.
		if err := out.Flush(); err != nil {
			fmt.Fprintf(os.Stderr, "policycheck: %v\n", err)
			os.Exit(1)
		}
	}
	if err := in.Err(); err != nil {
		fmt.Fprintf(os.Stderr, "policycheck: reading stdin: %v\n", err)
		os.Exit(1)
	}
}

func evaluate(loaded loadedPolicy, attrs attributes) evalAnswer {
	record := &authorizer.AttributesRecord{
		Verb:            attrs.Verb,
		Namespace:       attrs.Namespace,
		APIGroup:        attrs.APIGroup,
		Resource:        attrs.Resource,
		Subresource:     attrs.Subresource,
		Name:            attrs.Name,
		ResourceRequest: attrs.ResourceRequest,
		Path:            attrs.Path,
	}
	if attrs.User != nil {
		record.User = &user.DefaultInfo{Name: *attrs.User, Groups: attrs.Groups}
	}
	config := loaded.evaluator.EvaluatePolicyRule(record)
	var rule *int
	for index, alone := range loaded.rules {
		if alone.EvaluatePolicyRule(record).Level == auditinternal.LevelMetadata {
			rule = &index
			break
		}
	}
	stages := make([]string, 0, len(config.OmitStages))
	for _, stage := range config.OmitStages {
		stages = append(stages, string(stage))
	}
	sort.Strings(stages)
	return evalAnswer{
		Level:             string(config.Level),
		OmitStages:        stages,
		OmitManagedFields: config.OmitManagedFields,
		Rule:              rule,
	}
}
