// Command manager is the meshkeeper operator.
package main

import (
	"context"
	"crypto/ed25519"
	"errors"
	"flag"
	"fmt"
	"maps"
	"os"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/webhook"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/yaml"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
	"github.com/meshkeeper/meshkeeper/internal/bundle/oci"
	"github.com/meshkeeper/meshkeeper/internal/controller"
	"github.com/meshkeeper/meshkeeper/internal/helm"
	"github.com/meshkeeper/meshkeeper/internal/identity"
	"github.com/meshkeeper/meshkeeper/webhooks"
)

type options struct {
	metricsAddr, probeAddr string
	leaderElect            bool
	namespace              string
	webhookHost            string
	webhookPort            int
	webhookCertDir         string
	webhookConfigName      string
	webhookSecretName      string
	webhookHosts           string
	componentsNamespace    string
	bundlesDir             string
	prometheusAddress      string
	notEnrolledGrace       time.Duration
	agentImage             string
	images                 map[string]string
	componentValues        map[string]string
	spireServerAddress     string
	spireTLSDir            string
	spireRelayImage        string
	spireRelaySecret       string
	catalogSource          string
	catalogInterval        time.Duration
	catalogPublicKey       string
	catalogPlainHTTP       bool
	catalogCacheDir        string
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "spire-relay" {
		if err := spireRelay(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, "spire-relay:", err)
			os.Exit(1)
		}
		return
	}
	var o options
	flag.StringVar(&o.metricsAddr, "metrics-bind-address", ":8080", "Address of the metrics endpoint; 0 disables it.")
	flag.StringVar(&o.probeAddr, "health-probe-bind-address", ":8081", "Address of /healthz and /readyz.")
	flag.BoolVar(&o.leaderElect, "leader-elect", false, "Elect a leader so only one replica reconciles.")
	flag.StringVar(&o.namespace, "namespace", envOr("POD_NAMESPACE", "meshkeeper-system"), "Namespace meshkeeper runs in (webhook secret, leader lease).")
	flag.StringVar(&o.webhookHost, "webhook-host", "", "Address the webhook server binds to; empty means all interfaces.")
	flag.IntVar(&o.webhookPort, "webhook-port", 9443, "Port of the webhook server.")
	flag.StringVar(&o.webhookCertDir, "webhook-cert-dir", os.TempDir()+"/meshkeeper-webhook-certs", "Where the webhook serving certificate is written.")
	flag.StringVar(&o.webhookConfigName, "webhook-config-name", "meshkeeper-validating-webhook", "ValidatingWebhookConfiguration whose caBundle meshkeeper keeps current.")
	flag.StringVar(&o.webhookSecretName, "webhook-secret-name", "meshkeeper-webhook-cert", "Secret holding the webhook CA and serving certificate.")
	flag.StringVar(&o.webhookHosts, "webhook-hosts", "meshkeeper-webhook.meshkeeper-system.svc,meshkeeper-webhook.meshkeeper-system.svc.cluster.local", "Comma-separated DNS names and IPs the serving certificate covers.")
	flag.StringVar(&o.componentsNamespace, "components-namespace", "istio-system", "Namespace the mesh components are installed in.")
	flag.StringVar(&o.bundlesDir, "bundles-dir", "", "Load bundles from this directory instead of the embedded catalog (development).")
	flag.StringVar(&o.prometheusAddress, "prometheus-address", "", "Prometheus base URL for SLO analysis when a Mesh sets no spec.analysis.prometheus; empty: such rollouts only bake.")
	flag.StringVar(&o.spireServerAddress, "spire-server-address", "", "SPIRE server API for registration entries: unix:///path/api.sock, or host:port over mutual TLS (see --spire-tls-dir); empty: no registration.")
	flag.StringVar(&o.spireTLSDir, "spire-tls-dir", "", "Directory with tls.crt, tls.key and ca.crt for --spire-server-address host:port, when you provide the relay's certificates yourself (and its Secret spire-relay-tls); empty: meshkeeper makes and renews them.")
	flag.StringVar(&o.spireRelayImage, "spire-relay-image", "", "Image of the SPIRE admin API relay beside spire-server: this manager's own image (it runs `manager spire-relay`); required with --spire-server-address host:port.")
	flag.StringVar(&o.spireRelaySecret, "spire-relay-secret", "meshkeeper-spire-relay", "Secret in --namespace where meshkeeper keeps the relay's CA and its own client certificate.")
	flag.StringVar(&o.catalogSource, "catalog-source", "", "OCI reference of a bundle catalog to poll and merge with the embedded one, e.g. oci://registry.example.com/meshkeeper/catalog:stable (or pinned: ...@sha256:<digest>); empty: the embedded catalog only.")
	flag.DurationVar(&o.catalogInterval, "catalog-interval", 5*time.Minute, "How often --catalog-source is polled.")
	flag.StringVar(&o.catalogPublicKey, "catalog-public-key", "", "PEM file of the ed25519 public key catalog artifacts must be signed with; required unless --catalog-source pins a digest.")
	flag.BoolVar(&o.catalogPlainHTTP, "catalog-plain-http", false, "Talk plain HTTP to the catalog registry (a registry on loopback; never across a network).")
	flag.StringVar(&o.catalogCacheDir, "catalog-cache-dir", "", "Keep the last verified catalog artifact here (an emptyDir or a volume), so a restarted manager has its releases before the source answers; empty: memory only.")
	zapOpts := zap.Options{Development: false}
	flag.DurationVar(&o.notEnrolledGrace, "pod-enrolment-grace", controller.DefaultNotEnrolledGrace, "How long a node agent may leave a pod it should redirect unenrolled before the Mesh is Degraded (PodsNotEnrolled).")
	flag.StringVar(&o.agentImage, "agent-image", "", "Node agent image every bundle runs instead of its own (e.g. the one built for this cluster); empty: the bundle's.")
	o.images = map[string]string{}
	flag.Func("image", "NAME=REF: run image REF wherever the bundles name image NAME (nodeAgent, ztunnel, pilot, ...); repeatable. For development and tests, e.g. a stand-in for an upstream image.", func(v string) error {
		name, ref, ok := strings.Cut(v, "=")
		if !ok || name == "" || ref == "" {
			return fmt.Errorf("want NAME=REF, e.g. ztunnel=registry.example.com/ztunnel:1.28.2, got %q", v)
		}
		o.images[name] = ref
		return nil
	})
	o.componentValues = map[string]string{}
	flag.Func("component-values", "COMPONENT=FILE: merge the YAML values in FILE into every bundle's release of COMPONENT (node-agent, ztunnel, ...); repeatable. For chart settings no Mesh field carries.", func(v string) error {
		comp, file, ok := strings.Cut(v, "=")
		if !ok || comp == "" || file == "" {
			return fmt.Errorf("want COMPONENT=FILE, e.g. node-agent=values.yaml, got %q", v)
		}
		o.componentValues[comp] = file
		return nil
	})
	zapOpts.BindFlags(flag.CommandLine)
	flag.Parse()
	ctrl.SetLogger(zap.New(zap.UseFlagOptions(&zapOpts)))

	if err := run(ctrl.SetupSignalHandler(), o); err != nil {
		ctrl.Log.Error(err, "Manager exited")
		os.Exit(1)
	}
}

func run(ctx context.Context, o options) error {
	log := ctrl.Log.WithName("setup")
	scheme := runtime.NewScheme()
	utilruntime.Must(clientgoscheme.AddToScheme(scheme))
	utilruntime.Must(meshv1.AddToScheme(scheme))
	utilruntime.Must(gatewayv1.Install(scheme)) // waypoints (internal/controller/mesh_waypoints.go)

	src, err := catalogSourceFlags(o)
	if err != nil {
		return err
	}
	cfg, err := ctrl.GetConfig()
	if err != nil {
		return fmt.Errorf("load kubeconfig: %w", err)
	}

	// The serving certificate must exist before the webhook server starts.
	certOpts := webhooks.CertOptions{
		Namespace:         o.namespace,
		SecretName:        o.webhookSecretName,
		WebhookConfigName: o.webhookConfigName,
		CertDir:           o.webhookCertDir,
		Hosts:             splitList(o.webhookHosts),
	}
	direct, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		return fmt.Errorf("create client: %w", err)
	}
	if err := ensureCertsWithRetry(ctx, direct, certOpts); err != nil {
		return err
	}

	images := maps.Clone(o.images)
	if o.agentImage != "" {
		if images == nil {
			images = map[string]string{}
		}
		images[bundle.ImageNodeAgent] = o.agentImage
	}
	catalog, err := loadCatalog(o.bundlesDir, images, o.componentValues)
	if err != nil {
		return err
	}
	helmClient, err := helm.New(cfg, o.namespace, ctrl.Log.WithName("helm"))
	if err != nil {
		return fmt.Errorf("create helm client: %w", err)
	}

	// Cache only the objects meshkeeper's releases render (controller.CacheOptions).
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                  scheme,
		Cache:                   controller.CacheOptions(o.componentsNamespace),
		Metrics:                 metricsserver.Options{BindAddress: o.metricsAddr},
		HealthProbeBindAddress:  o.probeAddr,
		LeaderElection:          o.leaderElect,
		LeaderElectionID:        "meshkeeper.dev",
		LeaderElectionNamespace: o.namespace,
		WebhookServer: webhook.NewServer(webhook.Options{
			Host:    o.webhookHost,
			Port:    o.webhookPort,
			CertDir: o.webhookCertDir,
		}),
	})
	if err != nil {
		return fmt.Errorf("create manager: %w", err)
	}

	live, checked, err := catalogSource(mgr, catalog, src, o)
	if err != nil {
		return err
	}
	spireServer, spireRelay, err := spireFlags(o, direct)
	if err != nil {
		return err
	}
	if err := (&controller.MeshReconciler{
		Client:              mgr.GetClient(),
		Recorder:            mgr.GetEventRecorder("meshkeeper"),
		Helm:                helmClient,
		Catalog:             catalog,
		Catalogs:            live,
		CatalogChecked:      checked,
		ComponentsNamespace: o.componentsNamespace,
		PrometheusAddress:   o.prometheusAddress,
		NotEnrolledGrace:    o.notEnrolledGrace,
		SpireServer:         spireServer,
		SpireRelay:          spireRelay,
		Workloads:           direct,
	}).SetupWithManager(mgr); err != nil {
		return fmt.Errorf("set up mesh controller: %w", err)
	}
	if err := webhooks.SetupWithManager(mgr, webhooks.WithCatalog(catalog)); err != nil {
		return fmt.Errorf("set up mesh webhook: %w", err)
	}
	if err := mgr.Add(webhooks.NewCertRefresher(direct, certOpts, time.Hour)); err != nil {
		return fmt.Errorf("add certificate refresher: %w", err)
	}
	if err := mgr.AddHealthzCheck("healthz", healthz.Ping); err != nil {
		return err
	}
	if err := mgr.AddReadyzCheck("webhook", mgr.GetWebhookServer().StartedChecker()); err != nil {
		return err
	}

	log.Info("Starting manager", "namespace", o.namespace, "webhookPort", o.webhookPort,
		"componentsNamespace", o.componentsNamespace, "bundles", catalog.Versions())
	return mgr.Start(ctx)
}

// spireFlags: how the manager reaches the SPIRE server API. host:port is
// the relay beside spire-server, with the client certificate from
// --spire-tls-dir, or else from the Secret meshkeeper keeps.
func spireFlags(o options, c client.Client) (controller.SpireConnector, func() *controller.SpireRelay, error) {
	addr := o.spireServerAddress
	if addr == "" || strings.HasPrefix(addr, "unix:") {
		return identity.Connector(addr, o.spireTLSDir), nil, nil
	}
	if o.spireRelayImage == "" {
		return nil, nil, fmt.Errorf("--spire-server-address %s is the SPIRE admin API relay, which runs beside spire-server: set --spire-relay-image to this manager's image", addr)
	}
	relay := &controller.SpireRelay{Image: o.spireRelayImage, ManageCerts: o.spireTLSDir == "", Namespace: o.namespace, Secret: o.spireRelaySecret}
	get := func() *controller.SpireRelay { return relay }
	if !relay.ManageCerts {
		return identity.Connector(addr, o.spireTLSDir), get, nil
	}
	load := func(ctx context.Context) (map[string][]byte, error) {
		var s corev1.Secret
		if err := c.Get(ctx, client.ObjectKey{Namespace: o.namespace, Name: o.spireRelaySecret}, &s); err != nil {
			return nil, err
		}
		return s.Data, nil
	}
	return identity.SecretConnector(addr, "", load), get, nil
}

// spireRelay is `manager spire-relay`: the relay container in spire-server's
// pod (bundles/charts/spire-server).
func spireRelay(args []string) error {
	fs := flag.NewFlagSet("spire-relay", flag.ContinueOnError)
	var o identity.RelayOptions
	fs.StringVar(&o.Listen, "listen", ":8082", "Mutual-TLS address the admin API is relayed on.")
	fs.StringVar(&o.Health, "health", ":8083", "Address of /live and /ready (plain HTTP); empty: none.")
	fs.StringVar(&o.Socket, "socket", "/run/spire/server-tmp/spire-server/private/api.sock", "spire-server's admin API socket.")
	fs.StringVar(&o.TLSDir, "tls-dir", "/run/spire/relay-tls", "Directory with tls.crt, tls.key (serving) and ca.crt (client CAs), re-read at every handshake.")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx := ctrl.SetupSignalHandler()
	fmt.Fprintf(os.Stderr, "spire-relay: relaying %s on %s (mutual TLS)\n", o.Socket, o.Listen)
	return identity.RunRelay(ctx, o)
}

// ensureCertsWithRetry waits out a briefly unavailable API server at start.
func ensureCertsWithRetry(ctx context.Context, c client.Client, opts webhooks.CertOptions) error {
	var err error
	for attempt := 0; attempt < 10; attempt++ {
		if err = webhooks.EnsureCerts(ctx, c, opts); err == nil {
			return nil
		}
		ctrl.Log.WithName("setup").Info("Webhook certificate not ready, retrying", "error", err.Error())
		select {
		case <-ctx.Done():
			return errors.Join(ctx.Err(), err)
		case <-time.After(time.Duration(attempt+1) * time.Second):
		}
	}
	return fmt.Errorf("webhook serving certificate: %w", err)
}

func loadCatalog(dir string, images, componentValues map[string]string) (*bundle.Catalog, error) {
	c := bundle.Default()
	if dir != "" {
		var err error
		if c, err = bundle.FromDir(dir); err != nil {
			return nil, fmt.Errorf("load bundles from %s: %w", dir, err)
		}
	}
	c, err := c.WithImages(images)
	if err != nil {
		return nil, fmt.Errorf("--image/--agent-image: %w", err)
	}
	for _, comp := range slices.Sorted(maps.Keys(componentValues)) {
		file := componentValues[comp]
		raw, err := os.ReadFile(file)
		if err != nil {
			return nil, fmt.Errorf("--component-values %s: %w", comp, err)
		}
		var values map[string]any
		if err := yaml.Unmarshal(raw, &values); err != nil {
			return nil, fmt.Errorf("--component-values %s=%s: %w", comp, file, err)
		}
		if c, err = c.WithValues(bundle.Component(comp), values); err != nil {
			return nil, fmt.Errorf("--component-values: %w", err)
		}
	}
	return c, nil
}

// catalogSource sets up the poller of --catalog-source: the live catalog it
// feeds and the channel that wakes the Meshes after each check. Without a
// source the embedded catalog is all there is.
// catalogSourceFlags checks the --catalog-* flags before anything starts
// (bad flags fail at once, with the flag's name); nil without a source.
func catalogSourceFlags(o options) (*oci.Source, error) {
	if o.catalogSource == "" {
		if o.catalogPublicKey != "" || o.catalogCacheDir != "" {
			return nil, errors.New("--catalog-public-key and --catalog-cache-dir need --catalog-source")
		}
		return nil, nil
	}
	var key ed25519.PublicKey
	if o.catalogPublicKey != "" {
		raw, err := os.ReadFile(o.catalogPublicKey)
		if err != nil {
			return nil, fmt.Errorf("--catalog-public-key: %w", err)
		}
		if key, err = oci.ParsePublicKey(raw); err != nil {
			return nil, fmt.Errorf("--catalog-public-key %s: %w", o.catalogPublicKey, err)
		}
	}
	src, err := oci.NewSource(o.catalogSource, key, o.catalogPlainHTTP)
	if err != nil {
		return nil, fmt.Errorf("--catalog-source: %w", err)
	}
	if o.catalogCacheDir != "" {
		src = src.WithCache(o.catalogCacheDir)
	}
	if o.catalogInterval < time.Second {
		return nil, fmt.Errorf("--catalog-interval %s: want at least 1s", o.catalogInterval)
	}
	return src, nil
}

func catalogSource(mgr ctrl.Manager, embedded *bundle.Catalog, src *oci.Source, o options) (*bundle.Live, chan event.GenericEvent, error) {
	live := bundle.NewLive(embedded, "")
	if src == nil {
		return live, nil, nil
	}
	live = bundle.NewLive(embedded, src.String())
	checked := make(chan event.GenericEvent, 1)
	poller := &oci.Poller{Source: src, Interval: o.catalogInterval, Live: live, Checked: func() {
		select {
		case checked <- event.GenericEvent{Object: &meshv1.Mesh{}}:
		default: // a wake-up is already pending
		}
	}}
	// Check once before the controller starts, so the first reconcile
	// already resolves against the releases the source serves (a Mesh on a
	// release only the source has would otherwise stall until the next
	// check). A source that does not answer delays the start by at most the
	// check's timeout; the catalog is then the embedded one until it does.
	logCtx := ctrl.LoggerInto(context.Background(), ctrl.Log.WithName("catalog"))
	poller.Restore(logCtx)
	poller.Check(logCtx)
	if err := mgr.Add(poller); err != nil {
		return nil, nil, fmt.Errorf("add catalog poller: %w", err)
	}
	return live, checked, nil
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}
