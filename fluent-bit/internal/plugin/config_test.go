package plugin

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"
)

// TestParseConfigDefaults pins the defaults of an [OUTPUT] section that sets nothing.
func TestParseConfigDefaults(t *testing.T) {
	config, problems := ParseConfig(mapGetter{})
	if len(problems) != 0 {
		t.Fatalf("problems = %v", problems)
	}
	if want, got := "unix:///run/auditrelay/relay.sock", config.Target; want != got {
		t.Errorf("Target = %q, want %q", got, want)
	}
	if want, got := 2*time.Second, config.Timeout; want != got {
		t.Errorf("Timeout = %v, want %v", got, want)
	}
	if want, got := 30*time.Second, config.Wait; want != got {
		t.Errorf("Wait = %v, want %v", got, want)
	}
	if config.TLS != nil {
		t.Errorf("TLS = %+v, want nil for a Unix socket", config.TLS)
	}
	if len(config.Properties) != 0 {
		t.Errorf("Properties = %v, want none: unset properties are not sent", config.Properties)
	}
}

// TestParseConfigSendsEveryKnownPropertySet pins that Configure carries exactly the
// properties the user set, the plugin's and the pipeline's, and nothing unknown.
func TestParseConfigSendsEveryKnownPropertySet(t *testing.T) {
	section := mapGetter{
		"sidecar_address": "unix:///tmp/relay.sock",
		"sidecar_timeout": "500ms",
		"stream":          "Custom-Audit_CL",
		"client_secret":   "s3cr3t",
		"cluster_name":    "",
		"no_such_key":     "ignored",
	}
	config, problems := ParseConfig(section)
	if len(problems) != 0 {
		t.Fatalf("problems = %v", problems)
	}
	want := map[string]string{
		"sidecar_address": "unix:///tmp/relay.sock",
		"sidecar_timeout": "500ms",
		"stream":          "Custom-Audit_CL",
		"client_secret":   "s3cr3t",
		"cluster_name":    "",
	}
	if !reflect.DeepEqual(want, config.Properties) {
		t.Errorf("Properties = %v, want %v", config.Properties, want)
	}
	if want, got := 500*time.Millisecond, config.Timeout; want != got {
		t.Errorf("Timeout = %v, want %v", got, want)
	}
}

// TestParseConfigProblems pins the error for each kind of bad plugin property: it names
// the property, the value and what was expected, like the sidecar's errors.
func TestParseConfigProblems(t *testing.T) {
	cases := []struct {
		name    string
		section mapGetter
		want    []Problem
	}{
		{"relative unix path", mapGetter{"sidecar_address": "unix://relay.sock"},
			[]Problem{{"sidecar_address", "unix://relay.sock", "unix:///absolute/path.sock or host:port"}}},
		{"no port", mapGetter{"sidecar_address": "sidecar"},
			[]Problem{{"sidecar_address", "sidecar", "unix:///absolute/path.sock or host:port"}}},
		{"port out of range", mapGetter{"sidecar_address": "sidecar:70000"},
			[]Problem{{"sidecar_address", "sidecar:70000", "unix:///absolute/path.sock or host:port"}}},
		{"timeout without number", mapGetter{"sidecar_timeout": "soon"},
			[]Problem{{"sidecar_timeout", "soon", "a duration such as 500ms, 5s, 2m or 1h"}}},
		{"zero wait", mapGetter{"sidecar_wait": "0s"},
			[]Problem{{"sidecar_wait", "0s", "a positive duration"}}},
		{"tcp without ca", mapGetter{"sidecar_address": "sidecar:50051"},
			[]Problem{{"sidecar_tls_ca", "", "a CA file when sidecar_address is host:port (TCP always uses TLS)"}}},
		{"tcp with missing ca file", mapGetter{"sidecar_address": "sidecar:50051", "sidecar_tls_ca": "/nonexistent/ca.pem"},
			[]Problem{{"sidecar_tls_ca", "/nonexistent/ca.pem", "a readable PEM CA file (open /nonexistent/ca.pem: no such file or directory)"}}},
		{"two problems", mapGetter{"sidecar_timeout": "-1s", "sidecar_wait": "ages"},
			[]Problem{
				{"sidecar_timeout", "-1s", "a duration such as 500ms, 5s, 2m or 1h"},
				{"sidecar_wait", "ages", "a duration such as 500ms, 5s, 2m or 1h"},
			}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, problems := ParseConfig(tc.section)
			if !reflect.DeepEqual(tc.want, problems) {
				t.Errorf("problems = %v, want %v", problems, tc.want)
			}
		})
	}
}

// TestParseDurations pins the duration grammar shared with the sidecar.
func TestParseDurations(t *testing.T) {
	cases := map[string]time.Duration{
		"2":      2 * time.Second,
		"1.5":    1500 * time.Millisecond,
		"500ms":  500 * time.Millisecond,
		"5s":     5 * time.Second,
		" 2m ":   2 * time.Minute,
		"1H":     time.Hour,
		"250 ms": 250 * time.Millisecond,
	}
	for text, want := range cases {
		got, err := parsePositiveDuration(text)
		if err != nil || got != want {
			t.Errorf("parsePositiveDuration(%q) = %v, %v; want %v", text, got, err, want)
		}
	}
}

// TestParseConfigLoadsMutualTLS pins that a host:port address with a CA and a client
// certificate yields a TLS configuration presenting that certificate.
func TestParseConfigLoadsMutualTLS(t *testing.T) {
	dir := t.TempDir()
	ca, cert, key := writeSelfSigned(t, dir)
	config, problems := ParseConfig(mapGetter{
		"sidecar_address": "127.0.0.1:50051", "sidecar_tls_ca": ca, "sidecar_tls_cert": cert, "sidecar_tls_key": key,
	})
	if len(problems) != 0 {
		t.Fatalf("problems = %v", problems)
	}
	if want, got := "dns:///127.0.0.1:50051", config.Target; want != got {
		t.Errorf("Target = %q, want %q", got, want)
	}
	if want, got := 1, len(config.TLS.Config().Certificates); want != got {
		t.Errorf("client certificates = %d, want %d", got, want)
	}
	if config.TLS.Config().RootCAs == nil {
		t.Error("RootCAs = nil, want the CA of sidecar_tls_ca")
	}
}

// TestParseConfigCertNeedsKey pins that a client certificate without its key is refused.
func TestParseConfigCertNeedsKey(t *testing.T) {
	dir := t.TempDir()
	ca, cert, _ := writeSelfSigned(t, dir)
	_, problems := ParseConfig(mapGetter{"sidecar_address": "[::1]:50051", "sidecar_tls_ca": ca, "sidecar_tls_cert": cert})
	want := []Problem{{"sidecar_tls_key", "", "a key file when sidecar_tls_cert is set"}}
	if !reflect.DeepEqual(want, problems) {
		t.Errorf("problems = %v, want %v", problems, want)
	}
}

// writeSelfSigned writes a self-signed certificate (serving as its own CA) and its key.
func writeSelfSigned(t *testing.T, dir string) (ca, cert, key string) {
	t.Helper()
	private, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	template := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "auditrelay test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, template, template, &private.PublicKey, private)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(private)
	if err != nil {
		t.Fatal(err)
	}
	cert = filepath.Join(dir, "cert.pem")
	key = filepath.Join(dir, "key.pem")
	writePEM(t, cert, "CERTIFICATE", der)
	writePEM(t, key, "EC PRIVATE KEY", keyDER)
	return cert, cert, key
}

func writePEM(t *testing.T, path, kind string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}
