// Command loadgen sends a bounded mix of requests to the test control plane's kube-apiserver so
// that it writes a large, realistic audit log: reads, lists, writes with bodies, secrets,
// forbidden, anonymous and impersonated requests, health probes and events, from several
// identities over keep-alive HTTP/2 connections. It stops after -requests requests or
// -max-duration, whichever comes first, and prints a JSON summary on stdout.
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

const (
	admin     = "kubernetes-admin"
	developer = "dev-alice"
	node      = "system:node:node-1"
	anonymous = "anonymous"
)

type request struct {
	identity string
	method   string
	path     string
	body     any
	header   map[string]string
}

type options struct {
	server      string
	caFile      string
	pkiDir      string
	namespace   string
	requests    int64
	clients     int
	maxDuration time.Duration
	seed        uint64
}

type summary struct {
	Requests int64            `json:"requests"`
	Errors   int64            `json:"errors"`
	Statuses map[string]int64 `json:"statuses"`
	Seconds  float64          `json:"seconds"`
}

func parseOptions() options {
	var o options
	flag.StringVar(&o.server, "server", "", "kube-apiserver URL (required)")
	flag.StringVar(&o.caFile, "ca", "", "CA certificate, PEM (required)")
	flag.StringVar(&o.pkiDir, "pki", "", "directory with <identity>.crt/.key client pairs (required)")
	flag.StringVar(&o.namespace, "namespace", "load", "namespace of the load's objects")
	flag.Int64Var(&o.requests, "requests", 100000, "requests to send")
	flag.IntVar(&o.clients, "clients", 32, "concurrent workers")
	flag.DurationVar(&o.maxDuration, "max-duration", 10*time.Minute, "stop after this long")
	flag.Uint64Var(&o.seed, "seed", 1, "seed of the request mix")
	flag.Parse()
	if o.server == "" || o.caFile == "" || o.pkiDir == "" {
		log.Fatal("-server, -ca and -pki are required")
	}
	return o
}

func clientFor(o options, identity string, roots *x509.CertPool) (*http.Client, error) {
	config := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
	if identity != anonymous {
		stem := filepath.Join(o.pkiDir, strings.ReplaceAll(identity, ":", "-"))
		pair, err := tls.LoadX509KeyPair(stem+".crt", stem+".key")
		if err != nil {
			return nil, fmt.Errorf("client pair for %s: %w", identity, err)
		}
		config.Certificates = []tls.Certificate{pair}
	}
	transport := &http.Transport{
		TLSClientConfig:     config,
		ForceAttemptHTTP2:   true,
		MaxIdleConnsPerHost: o.clients,
		Proxy:               nil, // loopback only, never through a proxy
	}
	return &http.Client{Transport: transport, Timeout: 30 * time.Second}, nil
}

func configMap(namespace, name string, size int) map[string]any {
	return map[string]any{
		"apiVersion": "v1", "kind": "ConfigMap",
		"metadata": map[string]any{"name": name, "namespace": namespace, "labels": map[string]string{"app": "load"}},
		"data":     map[string]string{"payload": strings.Repeat("x", size)},
	}
}

func event(namespace, name string) map[string]any {
	return map[string]any{
		"apiVersion": "v1", "kind": "Event",
		"metadata":       map[string]any{"name": name, "namespace": namespace},
		"involvedObject": map[string]any{"kind": "ConfigMap", "name": "shared", "namespace": namespace},
		"reason":         "Load", "message": "benchmark traffic", "type": "Normal",
	}
}

// round is one worker's next batch: mostly reads and probes, some writes, every fifth round a
// few security-relevant requests.
func round(namespace string, worker, sequence int, rng *rand.Rand) []request {
	ns := "/api/v1/namespaces/" + namespace
	name := fmt.Sprintf("cm-%d-%d", worker, sequence)
	batch := []request{
		{identity: admin, method: "GET", path: ns + "/configmaps/shared"},
		{identity: admin, method: "GET", path: ns + "/configmaps?limit=20"},
		{identity: admin, method: "GET", path: ns + "/pods"},
		{identity: admin, method: "GET", path: "/readyz"},
		{identity: node, method: "GET", path: "/api/v1/nodes/node-1"},
		{identity: admin, method: "POST", path: ns + "/configmaps", body: configMap(namespace, name, 16+rng.IntN(2033))},
		{identity: admin, method: "GET", path: ns + "/configmaps/" + name},
		{identity: admin, method: "DELETE", path: ns + "/configmaps/" + name},
		{identity: admin, method: "POST", path: ns + "/events", body: event(namespace, fmt.Sprintf("load.%d.%d", worker, sequence))},
	}
	if sequence%5 == 0 {
		batch = append(batch,
			request{identity: admin, method: "GET", path: ns + "/secrets/shared"},
			request{identity: developer, method: "GET", path: "/api/v1/namespaces/kube-system/secrets"},
			request{identity: anonymous, method: "GET", path: "/api/v1/pods"},
			request{identity: admin, method: "GET", path: ns + "/pods", header: map[string]string{
				"Impersonate-User": "system:serviceaccount:" + namespace + ":default",
			}},
			request{identity: admin, method: "GET", path: "/version"},
		)
	}
	return batch
}

func send(ctx context.Context, client *http.Client, server string, r request) (int, error) {
	var body io.Reader
	if r.body != nil {
		encoded, err := json.Marshal(r.body)
		if err != nil {
			return 0, err
		}
		body = bytes.NewReader(encoded)
	}
	req, err := http.NewRequestWithContext(ctx, r.method, server+r.path, body)
	if err != nil {
		return 0, err
	}
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", "auditrelay-loadgen/1.0")
	if r.body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	for key, value := range r.header {
		req.Header.Set(key, value)
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return 0, err
	}
	return resp.StatusCode, nil
}

func run(o options) (summary, error) {
	pem, err := os.ReadFile(o.caFile)
	if err != nil {
		return summary{}, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return summary{}, fmt.Errorf("%s: no PEM certificate", o.caFile)
	}
	clients := map[string]*http.Client{}
	for _, identity := range []string{admin, developer, node, anonymous} {
		if clients[identity], err = clientFor(o, identity, roots); err != nil {
			return summary{}, err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), o.maxDuration)
	defer cancel()

	var budget atomic.Int64
	budget.Store(o.requests)
	var mu sync.Mutex
	statuses := map[string]int64{}
	var errors atomic.Int64
	var wg sync.WaitGroup
	started := time.Now()
	for worker := range o.clients {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(o.seed, uint64(worker)))
			local := map[string]int64{}
			for sequence := 0; ctx.Err() == nil; sequence++ {
				batch := round(o.namespace, worker, sequence, rng)
				if budget.Add(-int64(len(batch))) <= -int64(len(batch)) {
					break
				}
				for _, r := range batch {
					code, err := send(ctx, clients[r.identity], o.server, r)
					if err != nil {
						if ctx.Err() == nil {
							errors.Add(1)
						}
						continue
					}
					local[fmt.Sprint(code)]++
				}
			}
			mu.Lock()
			defer mu.Unlock()
			for code, count := range local {
				statuses[code] += count
			}
		})
	}
	wg.Wait()
	total := int64(0)
	for _, count := range statuses {
		total += count
	}
	return summary{total, errors.Load(), statuses, time.Since(started).Seconds()}, nil
}

func main() {
	log.SetFlags(0)
	result, err := run(parseOptions())
	if err != nil {
		log.Fatal(err)
	}
	if err := json.NewEncoder(os.Stdout).Encode(result); err != nil {
		log.Fatal(err)
	}
}
