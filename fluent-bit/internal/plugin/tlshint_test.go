package plugin

import (
	"errors"
	"strings"
	"testing"
)

func TestTLSHintNamesTheMissingOrRefusedClientCertificate(t *testing.T) {
	preface := errors.New(`connection error: desc = "error reading server preface: EOF"`)
	cases := []struct {
		name  string
		files *TLSFiles
		err   error
		want  string // a part of the hint; empty: no hint
	}{
		{"no client certificate", &TLSFiles{CA: "ca.crt"}, preface, "because it requires a client certificate; set sidecar_tls_cert"},
		{"TLS 1.3 alert", &TLSFiles{CA: "ca.crt"}, errors.New("remote error: tls: certificate required"), "requires a client certificate"},
		{"broken pipe", &TLSFiles{CA: "ca.crt"}, errors.New("write tcp 127.0.0.1:1->127.0.0.1:2: write: broken pipe"), "requires a client certificate"},
		{"refused client certificate", &TLSFiles{CA: "ca.crt", Cert: "client.crt"}, preface, "did not accept the client certificate client.crt"},
		{"unix socket", nil, preface, ""},
		{"another error", &TLSFiles{CA: "ca.crt"}, errors.New("x509: certificate signed by unknown authority"), ""},
		{"no error", &TLSFiles{CA: "ca.crt"}, nil, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := tlsHint(c.files, c.err)
			if c.want == "" && got != "" || !strings.Contains(got, c.want) {
				t.Fatalf("tlsHint = %q, want it to contain %q", got, c.want)
			}
		})
	}
}
