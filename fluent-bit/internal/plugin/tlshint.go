package plugin

import (
	"fmt"
	"strings"
)

// refusedClientSigns are how grpc reports a sidecar that ended the connection during or right
// after the TLS handshake: with TLS 1.3 the client finishes first and then sees only the
// closed connection (no server preface, a broken pipe, a reset), sometimes the alert itself.
var refusedClientSigns = []string{
	"error reading server preface",
	"write: broken pipe",
	"connection reset by peer",
	"tls: certificate required",
	"tls: bad certificate",
	"tls: unknown certificate authority",
}

// tlsHint says why a TCP sidecar most likely closed the connection: it did not accept the
// plugin as a TLS client. Empty for other errors and for Unix sockets.
func tlsHint(files *TLSFiles, err error) string {
	if files == nil || err == nil {
		return ""
	}
	text := err.Error()
	for _, sign := range refusedClientSigns {
		if strings.Contains(text, sign) {
			if files.Cert == "" {
				return " (the sidecar closed the TLS connection, most likely because it requires a client certificate; " +
					"set sidecar_tls_cert and sidecar_tls_key to one signed by the CA of its --tls-client-ca)"
			}
			return fmt.Sprintf(" (the sidecar closed the TLS connection, most likely because it did not accept the client certificate %s; "+
				"it must be signed by the CA of the sidecar's --tls-client-ca)", files.Cert)
		}
	}
	return ""
}
