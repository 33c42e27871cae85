package plugin

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/auditrelay/auditrelay/fluent-bit/internal/properties"
)

// Getter answers "what is the value of key K" for one [OUTPUT] section, as Fluent Bit's
// output_get_property does: ok is false when the key is not set.
type Getter interface {
	Get(key string) (value string, ok bool)
}

// Config is one output instance's configuration.
type Config struct {
	// Address is sidecar_address as written: unix:///path.sock or host:port.
	Address string
	// Target is the gRPC dial target for Address.
	Target string
	// TLS is the client TLS configuration for a host:port address; nil for a Unix socket.
	TLS *TLSFiles
	// Timeout is the hard deadline of one flush (sidecar_timeout).
	Timeout time.Duration
	// Wait is how long init waits for the sidecar (sidecar_wait).
	Wait time.Duration
	// Properties is every property the user set, keyed by its lower-case name, as sent in
	// Configure. Unset properties are absent.
	Properties map[string]string
}

// TLSFiles names the files of a TLS connection to the sidecar; they are loaded once at init.
type TLSFiles struct {
	CA, Cert, Key string
	config        *tls.Config
}

// Config returns the loaded client TLS configuration.
func (t *TLSFiles) Config() *tls.Config { return t.config }

// Problem is one property that cannot be used, worded like the sidecar's errors.
type Problem struct {
	Property string
	// Value is the offending value; empty for a missing property or a secret.
	Value    string
	Expected string
}

func (p Problem) String() string {
	if p.Value == "" {
		return fmt.Sprintf("property '%s': expected %s", p.Property, p.Expected)
	}
	return fmt.Sprintf("property '%s' = '%s': expected %s", p.Property, p.Value, p.Expected)
}

// ParseConfig reads every property from g and validates the plugin's own. The pipeline's
// properties are passed on unchecked: the sidecar validates them in Configure.
func ParseConfig(g Getter) (Config, []Problem) {
	cfg := Config{Properties: map[string]string{}}
	for _, prop := range properties.All {
		if value, ok := g.Get(prop.Name); ok {
			cfg.Properties[prop.Name] = value
		}
	}
	var problems []Problem
	report := func(name string, err error) {
		if err != nil {
			problems = append(problems, problemFor(name, cfg.Properties[name], err))
		}
	}
	var err error
	cfg.Address, cfg.Target, err = parseAddress(cfg.value("sidecar_address"))
	report("sidecar_address", err)
	cfg.Timeout, err = parsePositiveDuration(cfg.value("sidecar_timeout"))
	report("sidecar_timeout", err)
	cfg.Wait, err = parsePositiveDuration(cfg.value("sidecar_wait"))
	report("sidecar_wait", err)
	if cfg.Address != "" && !strings.HasPrefix(cfg.Address, "unix://") {
		var tlsProblems []Problem
		cfg.TLS, tlsProblems = cfg.loadTLS()
		problems = append(problems, tlsProblems...)
	}
	return cfg, problems
}

// value is the property as set, or its default.
func (c Config) value(name string) string {
	if v, ok := c.Properties[name]; ok {
		return v
	}
	return propertyDefault(name)
}

func propertyDefault(name string) string {
	for _, prop := range properties.All {
		if prop.Name == name {
			return prop.Default
		}
	}
	return ""
}

func problemFor(name, value string, err error) Problem {
	for _, prop := range properties.All {
		if prop.Name == name && prop.Secret {
			value = ""
		}
	}
	return Problem{Property: name, Value: value, Expected: err.Error()}
}

var errAddress = fmt.Errorf("unix:///absolute/path.sock or host:port")

// parseAddress returns the address and its gRPC dial target.
func parseAddress(text string) (address, target string, err error) {
	value := strings.TrimSpace(text)
	if path, ok := strings.CutPrefix(value, "unix://"); ok {
		if !strings.HasPrefix(path, "/") {
			return "", "", errAddress
		}
		return value, value, nil
	}
	host, port, splitErr := net.SplitHostPort(value)
	number, portErr := strconv.Atoi(port)
	if splitErr != nil || host == "" || portErr != nil || number <= 0 || number > 65535 {
		return "", "", errAddress
	}
	return value, "dns:///" + value, nil
}

var durationPattern = regexp.MustCompile(`^\s*(\d+(?:\.\d+)?)\s*(?i:(ms|s|m|h))?\s*$`)

var durationUnits = map[string]time.Duration{
	"ms": time.Millisecond, "s": time.Second, "m": time.Minute, "h": time.Hour,
}

// parsePositiveDuration reads the sidecar's duration grammar: 500ms, 5s, 2m, 1h or seconds.
func parsePositiveDuration(text string) (time.Duration, error) {
	match := durationPattern.FindStringSubmatch(text)
	if match == nil {
		return 0, fmt.Errorf("a duration such as 500ms, 5s, 2m or 1h")
	}
	number, err := strconv.ParseFloat(match[1], 64)
	if err != nil {
		return 0, fmt.Errorf("a duration such as 500ms, 5s, 2m or 1h")
	}
	unit := durationUnits[strings.ToLower(match[2])]
	if match[2] == "" {
		unit = time.Second
	}
	duration := time.Duration(number * float64(unit))
	if duration <= 0 {
		return 0, fmt.Errorf("a positive duration")
	}
	return duration, nil
}

// loadTLS reads the CA and the optional client certificate for a host:port address:
// TCP between plugin and sidecar always means TLS.
func (c Config) loadTLS() (*TLSFiles, []Problem) {
	files := &TLSFiles{CA: c.Properties["sidecar_tls_ca"], Cert: c.Properties["sidecar_tls_cert"], Key: c.Properties["sidecar_tls_key"]}
	var problems []Problem
	files.config = &tls.Config{MinVersion: tls.VersionTLS12}
	if files.CA == "" {
		problems = append(problems, Problem{"sidecar_tls_ca", "", "a CA file when sidecar_address is host:port (TCP always uses TLS)"})
	} else if pool, err := loadCA(files.CA); err != nil {
		problems = append(problems, Problem{"sidecar_tls_ca", files.CA, err.Error()})
	} else {
		files.config.RootCAs = pool
	}
	switch {
	case files.Cert == "" && files.Key == "":
	case files.Cert == "":
		problems = append(problems, Problem{"sidecar_tls_cert", "", "a certificate file when sidecar_tls_key is set"})
	case files.Key == "":
		problems = append(problems, Problem{"sidecar_tls_key", "", "a key file when sidecar_tls_cert is set"})
	default:
		pair, err := tls.LoadX509KeyPair(files.Cert, files.Key)
		if err != nil {
			problems = append(problems, Problem{"sidecar_tls_cert", files.Cert, "a readable PEM certificate matching sidecar_tls_key (" + err.Error() + ")"})
		} else {
			files.config.Certificates = []tls.Certificate{pair}
		}
	}
	return files, problems
}

func loadCA(path string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("a readable PEM CA file (%v)", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("a PEM file with at least one CA certificate")
	}
	return pool, nil
}
