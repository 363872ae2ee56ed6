// Command manager is the meshkeeper operator.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/selection"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/webhook"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
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
	spireServerAddress     string
	spireTLSDir            string
}

func main() {
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
	flag.StringVar(&o.spireTLSDir, "spire-tls-dir", "", "Directory with tls.crt, tls.key and ca.crt for --spire-server-address host:port.")
	zapOpts := zap.Options{Development: false}
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

	catalog, err := loadCatalog(o.bundlesDir)
	if err != nil {
		return err
	}
	helmClient, err := helm.New(cfg, o.namespace, ctrl.Log.WithName("helm"))
	if err != nil {
		return fmt.Errorf("create helm client: %w", err)
	}

	// Cache only the objects meshkeeper's releases render, not every
	// Deployment, ConfigMap or Secret of the cluster.
	managedReq, err := labels.NewRequirement(meshv1.LabelComponent, selection.Exists, nil)
	if err != nil {
		return err
	}
	managed := cache.ByObject{Label: labels.NewSelector().Add(*managedReq)}
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme: scheme,
		Cache: cache.Options{ByObject: map[client.Object]cache.ByObject{
			&appsv1.Deployment{}:     managed,
			&appsv1.DaemonSet{}:      managed,
			&appsv1.StatefulSet{}:    managed,
			&corev1.ConfigMap{}:      managed,
			&corev1.Service{}:        managed,
			&corev1.ServiceAccount{}: managed,
		}},
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

	if err := (&controller.MeshReconciler{
		Client:              mgr.GetClient(),
		Recorder:            mgr.GetEventRecorder("meshkeeper"),
		Helm:                helmClient,
		Catalog:             catalog,
		ComponentsNamespace: o.componentsNamespace,
		PrometheusAddress:   o.prometheusAddress,
		SpireServer:         identity.Connector(o.spireServerAddress, o.spireTLSDir),
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

func loadCatalog(dir string) (*bundle.Catalog, error) {
	if dir == "" {
		return bundle.Default(), nil
	}
	c, err := bundle.FromDir(dir)
	if err != nil {
		return nil, fmt.Errorf("load bundles from %s: %w", dir, err)
	}
	return c, nil
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
