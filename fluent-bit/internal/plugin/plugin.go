package plugin

import (
	"fmt"
	"io"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/auditrelay/auditrelay/fluent-bit/internal/relaypb"
)

// PluginName is the Fluent Bit output name, the `Name` of the [OUTPUT] section.
const PluginName = "auditrelay"

// Description is the plugin's one-line description shown by Fluent Bit.
const Description = "Kubernetes audit events to Azure Monitor through the auditrelay sidecar"

// Dialer opens a client for a configuration's sidecar; Close ends the connection.
type Dialer func(Config) (Client, io.Closer, error)

// Plugin is the process-wide state of the plugin: every output instance and the
// connections they share. Fluent Bit keeps the Go runtime across a hot reload and
// registers the plugin again, so this state outlives a registration: connections opened
// before a reload are kept for the instances initialised after it.
type Plugin struct {
	dial Dialer

	mu        sync.Mutex
	started   int // instances initialised since the last registration, for their names
	reloading bool
	conns     map[connKey]*sharedConn
}

type connKey struct{ target, ca, cert, key string }

type sharedConn struct {
	client Client
	closer io.Closer
	users  int
}

// New returns the plugin state with the given dialer (DialGRPC in production).
func New(dial Dialer) *Plugin {
	return &Plugin{dial: dial, conns: map[connKey]*sharedConn{}}
}

// Registered is called for every FLBPluginRegister: at start and after each hot reload.
func (p *Plugin) Registered() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.started = 0
	p.reloading = false
}

// PreExit is called before each instance exits; reload tells whether a hot reload (and
// not a shutdown) follows, in which case connections are kept for the next instances.
func (p *Plugin) PreExit(reload bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.reloading = reload
}

// Init configures one [OUTPUT] instance: reads its properties, waits for the sidecar and
// configures its pipeline. It returns nil after logging why when the instance cannot run.
func (p *Plugin) Init(properties Getter, out Logger) *Forwarder {
	name := p.nextName()
	log := newInstanceLog(out, name)
	config, problems := ParseConfig(properties)
	if len(problems) > 0 {
		log.error("invalid configuration: %s", joinProblems(problems))
		return nil
	}
	client, release, err := p.acquire(config)
	if err != nil {
		log.error("cannot connect to the sidecar at %s: %v", config.Address, err)
		return nil
	}
	forwarder := newForwarder(name, config, client, log)
	forwarder.release = release
	if err := forwarder.Start(); err != nil {
		log.error("%v", err)
		release(false)
		return nil
	}
	log.info("connected to the sidecar at %s: pipeline %s", config.Address, forwarder.Pipeline())
	return forwarder
}

// Exit stops one instance. Its connection closes when no instance uses it any more,
// unless a hot reload is under way.
func (p *Plugin) Exit(f *Forwarder) {
	p.mu.Lock()
	keep := p.reloading
	p.mu.Unlock()
	f.release(keep)
	f.log.debug("stopped")
}

func (p *Plugin) nextName() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	name := fmt.Sprintf("%s.%d", PluginName, p.started)
	p.started++
	return name
}

// acquire returns the shared client for a configuration's sidecar and its release.
func (p *Plugin) acquire(config Config) (Client, func(keep bool), error) {
	key := connKey{target: config.Target}
	if config.TLS != nil {
		key.ca, key.cert, key.key = config.TLS.CA, config.TLS.Cert, config.TLS.Key
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	conn, ok := p.conns[key]
	if !ok {
		client, closer, err := p.dial(config)
		if err != nil {
			return nil, nil, err
		}
		conn = &sharedConn{client: client, closer: closer}
		p.conns[key] = conn
	}
	conn.users++
	var once sync.Once
	release := func(keep bool) { once.Do(func() { p.releaseConn(key, keep) }) }
	return conn.client, release, nil
}

func (p *Plugin) releaseConn(key connKey, keep bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	conn := p.conns[key]
	conn.users--
	if conn.users == 0 && !keep {
		delete(p.conns, key)
		_ = conn.closer.Close()
	}
}

// Connections is how many sidecar connections are open, for tests.
func (p *Plugin) Connections() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.conns)
}

// reconnectBackoff keeps reconnects to a restarted sidecar quick: it is local (same pod)
// or near, so gRPC's default of up to two minutes between attempts would only add delay.
var reconnectBackoff = backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 2 * time.Second}

// DialGRPC opens a gRPC client connection to the sidecar: plaintext over the Unix
// socket (protected by its file permissions), TLS (mTLS with a client certificate) over TCP.
// The connection is made lazily and re-made after failures by gRPC itself.
func DialGRPC(config Config) (Client, io.Closer, error) {
	creds := insecure.NewCredentials()
	if config.TLS != nil {
		creds = credentials.NewTLS(config.TLS.Config())
	}
	conn, err := grpc.NewClient(config.Target,
		grpc.WithTransportCredentials(creds),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: reconnectBackoff, MinConnectTimeout: 5 * time.Second}),
		grpc.WithUserAgent("auditrelay-fluent-bit/"+Version),
	)
	if err != nil {
		return nil, nil, err
	}
	return relaypb.NewRelayClient(conn), conn, nil
}
