// Command etcd runs a single-member etcd for the test control plane: the embed package of
// go.etcd.io/etcd/server/v3 at the version k8s.io/kubernetes itself requires, serving clients over
// mutual TLS on one loopback URL. It exits cleanly on SIGTERM or SIGINT.
package main

import (
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	"go.etcd.io/etcd/server/v3/embed"
)

type options struct {
	dataDir   string
	clientURL string
	peerURL   string
	certFile  string
	keyFile   string
	caFile    string
}

func parseOptions() (options, error) {
	var o options
	flag.StringVar(&o.dataDir, "data-dir", "", "directory for the member's data (required)")
	flag.StringVar(&o.clientURL, "listen-client-url", "", "https URL to serve clients on (required)")
	flag.StringVar(&o.peerURL, "listen-peer-url", "", "http URL for the (unused) peer listener (required)")
	flag.StringVar(&o.certFile, "cert-file", "", "server certificate, PEM (required)")
	flag.StringVar(&o.keyFile, "key-file", "", "server private key, PEM (required)")
	flag.StringVar(&o.caFile, "trusted-ca-file", "", "CA that signs client certificates, PEM (required)")
	flag.Parse()
	for name, value := range map[string]string{
		"data-dir": o.dataDir, "listen-client-url": o.clientURL, "listen-peer-url": o.peerURL,
		"cert-file": o.certFile, "key-file": o.keyFile, "trusted-ca-file": o.caFile,
	} {
		if value == "" {
			return o, fmt.Errorf("flag --%s is required", name)
		}
	}
	return o, nil
}

func config(o options) (*embed.Config, error) {
	client, err := url.Parse(o.clientURL)
	if err != nil {
		return nil, fmt.Errorf("--listen-client-url %q: %w", o.clientURL, err)
	}
	peer, err := url.Parse(o.peerURL)
	if err != nil {
		return nil, fmt.Errorf("--listen-peer-url %q: %w", o.peerURL, err)
	}
	cfg := embed.NewConfig()
	cfg.Name = "controlplane"
	cfg.Dir = o.dataDir
	cfg.LogLevel = "warn"
	cfg.ListenClientUrls = []url.URL{*client}
	cfg.AdvertiseClientUrls = []url.URL{*client}
	cfg.ListenPeerUrls = []url.URL{*peer}
	cfg.AdvertisePeerUrls = []url.URL{*peer}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.ClientTLSInfo = transport.TLSInfo{
		CertFile:       o.certFile,
		KeyFile:        o.keyFile,
		TrustedCAFile:  o.caFile,
		ClientCertAuth: true,
	}
	// The data lives in a throw-away test directory; fsync buys nothing there and costs the
	// shared machine's disk a great deal under the benchmark corpus generator.
	cfg.UnsafeNoFsync = true
	return cfg, nil
}

func run() error {
	o, err := parseOptions()
	if err != nil {
		return err
	}
	cfg, err := config(o)
	if err != nil {
		return err
	}
	server, err := embed.StartEtcd(cfg)
	if err != nil {
		return fmt.Errorf("etcd did not start: %w", err)
	}
	defer server.Close()

	select {
	case <-server.Server.ReadyNotify():
		log.Printf("etcd_ready client_url=%s", o.clientURL)
	case <-time.After(60 * time.Second):
		return fmt.Errorf("etcd was not ready within 60s")
	}

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	select {
	case sig := <-stop:
		log.Printf("etcd_stopping signal=%s", sig)
		return nil
	case err := <-server.Err():
		return fmt.Errorf("etcd failed: %w", err)
	}
}

func main() {
	log.SetFlags(log.LstdFlags | log.LUTC)
	if err := run(); err != nil {
		log.Print(err)
		os.Exit(1)
	}
}
