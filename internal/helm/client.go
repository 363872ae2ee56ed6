// Package helm wraps the Helm v4 SDK for the operator: releases stored as
// Secrets in one namespace, install/upgrade/rollback/uninstall with
// server-side apply, recovery of releases stuck in a pending state, readiness
// and drift repair of the deployed manifest, and offline rendering.
//
// It is the only package that imports helm.sh/helm. Everything is configured
// by hand from a *rest.Config: no kubeconfig file, no HELM_* environment, no
// CLI settings.
package helm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/go-logr/logr"
	"helm.sh/helm/v4/pkg/action"
	"helm.sh/helm/v4/pkg/kube"
	"helm.sh/helm/v4/pkg/storage"
	"helm.sh/helm/v4/pkg/storage/driver"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// FieldManager is the server-side apply field manager of every write Helm
// makes for meshkeeper (install, upgrade, rollback) and of Repair. Helm
// otherwise derives it from os.Args[0], which differs between the manager
// binary and test binaries.
const FieldManager = "meshkeeper-helm"

// DefaultMaxHistory is the number of revisions kept per release.
const DefaultMaxHistory = 10

// DefaultTimeout bounds waits and hooks when a Release has no Timeout.
const DefaultTimeout = 5 * time.Minute

func init() {
	// A package variable in Helm; this package is Helm's only user in the
	// process, so setting it once here is safe.
	kube.ManagedFieldsManager = FieldManager
}

// Client installs and manages Helm releases. Release records are Secrets in
// one storage namespace; the objects of a release go to its own namespace.
// It is safe for concurrent use; operations on the same release name are
// serialised.
type Client struct {
	// MaxHistory is the number of revisions kept per release (set by New to
	// DefaultMaxHistory).
	MaxHistory int

	getter           *restGetter
	clientset        kubernetes.Interface
	dynamic          dynamic.Interface
	storageNamespace string
	log              logr.Logger
	handler          slog.Handler

	locks sync.Map // release name -> *sync.Mutex
	// verified remembers, per release object, the revision and
	// resourceVersion at which Repair last found (or made) it free of drift:
	// an object still at that resourceVersion, for the same revision, is
	// unchanged and needs no dry run. One entry per object: it stays small.
	verified sync.Map // "<release>/<object key>" -> "<revision>/<resourceVersion>"
}

// New returns a Client talking to the cluster of cfg and storing releases in
// storageNamespace (which must exist).
func New(cfg *rest.Config, storageNamespace string, log logr.Logger) (*Client, error) {
	if cfg == nil {
		return nil, errors.New("helm: no rest config")
	}
	if storageNamespace == "" {
		return nil, errors.New("helm: no storage namespace")
	}
	cfg = rest.CopyConfig(cfg)
	// Helm issues many small requests (discovery, one GET per object);
	// client-go's default of 5 QPS makes an install take seconds.
	if cfg.QPS == 0 {
		cfg.QPS = 50
	}
	if cfg.Burst == 0 {
		cfg.Burst = 100
	}
	getter, err := newRESTGetter(cfg)
	if err != nil {
		return nil, err
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("helm: clientset: %w", err)
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("helm: dynamic client: %w", err)
	}
	log = log.WithName("helm")
	return &Client{
		MaxHistory:       DefaultMaxHistory,
		getter:           getter,
		clientset:        cs,
		dynamic:          dyn,
		storageNamespace: storageNamespace,
		log:              log,
		handler:          newLogHandler(log),
	}, nil
}

// lock serialises operations on one release name.
func (c *Client) lock(name string) func() {
	m, _ := c.locks.LoadOrStore(name, &sync.Mutex{})
	mu := m.(*sync.Mutex)
	mu.Lock()
	return mu.Unlock
}

// config builds the action configuration for releases whose objects live in
// namespace (the namespace Helm gives objects that have none). A fresh
// Configuration per operation, as helm-controller does: actions mutate it
// (capabilities, MaxHistory) and it is cheap; the discovery cache and REST
// mapper are shared.
func (c *Client) config(namespace string) *action.Configuration {
	getter := c.getter.forNamespace(namespace)
	kc := kube.New(getter)
	kc.Namespace = namespace
	kc.SetLogger(c.handler)

	d := driver.NewSecrets(c.clientset.CoreV1().Secrets(c.storageNamespace))
	d.SetLogger(c.handler)
	store := storage.Init(d)
	store.MaxHistory = c.maxHistory()
	store.SetLogger(c.handler)

	cfg := action.NewConfiguration(action.ConfigurationSetLogger(c.handler))
	cfg.RESTClientGetter = getter
	cfg.KubeClient = kc
	cfg.Releases = store
	return cfg
}

func (c *Client) maxHistory() int {
	if c.MaxHistory <= 0 {
		return DefaultMaxHistory
	}
	return c.MaxHistory
}

// restGetter is a genericclioptions.RESTClientGetter over a *rest.Config.
// Discovery is cached in memory and shared; Helm invalidates it before each
// action (capabilities), and the deferred REST mapper resets itself when a
// kind is unknown (new CRDs).
type restGetter struct {
	config    *rest.Config
	discovery discovery.CachedDiscoveryInterface
	mapper    meta.RESTMapper
	namespace string
}

var _ genericclioptions.RESTClientGetter = (*restGetter)(nil)

func newRESTGetter(cfg *rest.Config) (*restGetter, error) {
	dc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("helm: discovery client: %w", err)
	}
	cached := memory.NewMemCacheClient(dc)
	mapper := restmapper.NewShortcutExpander(restmapper.NewDeferredDiscoveryRESTMapper(cached), cached, nil)
	return &restGetter{config: cfg, discovery: cached, mapper: mapper}, nil
}

func (g *restGetter) forNamespace(ns string) *restGetter {
	cp := *g
	cp.namespace = ns
	return &cp
}

// ToRESTConfig returns a copy: kubectl's factory sets serializer defaults on
// the config it gets.
func (g *restGetter) ToRESTConfig() (*rest.Config, error) { return rest.CopyConfig(g.config), nil }

func (g *restGetter) ToDiscoveryClient() (discovery.CachedDiscoveryInterface, error) {
	return g.discovery, nil
}

func (g *restGetter) ToRESTMapper() (meta.RESTMapper, error) { return g.mapper, nil }

// ToRawKubeConfigLoader returns a loader that never reads a kubeconfig file.
func (g *restGetter) ToRawKubeConfigLoader() clientcmd.ClientConfig {
	return &fixedClientConfig{config: g.config, namespace: g.namespace}
}

// fixedClientConfig is a clientcmd.ClientConfig answering from memory.
type fixedClientConfig struct {
	config    *rest.Config
	namespace string
}

func (f *fixedClientConfig) RawConfig() (clientcmdapi.Config, error) {
	return *clientcmdapi.NewConfig(), nil
}

func (f *fixedClientConfig) ClientConfig() (*rest.Config, error) {
	return rest.CopyConfig(f.config), nil
}

func (f *fixedClientConfig) Namespace() (string, bool, error) {
	if f.namespace == "" {
		return "default", false, nil
	}
	return f.namespace, true, nil
}

// ConfigAccess is only used by kubectl's config commands.
func (f *fixedClientConfig) ConfigAccess() clientcmd.ConfigAccess { return nil }

// logHandler bridges Helm's slog output to logr. Helm's Debug records (one or
// more per object and wait event) go to V(2), so that V(1) stays readable for
// this package's own decisions; Info and Warn go to V(0), Error to Error.
type logHandler struct{ next slog.Handler }

func newLogHandler(log logr.Logger) slog.Handler {
	return &logHandler{next: logr.ToSlogHandler(log)}
}

func mapLevel(l slog.Level) slog.Level {
	if l < slog.LevelInfo {
		return slog.Level(-2)
	}
	return l
}

func (h *logHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return h.next.Enabled(ctx, mapLevel(l))
}

func (h *logHandler) Handle(ctx context.Context, r slog.Record) error {
	r.Level = mapLevel(r.Level)
	return h.next.Handle(ctx, r)
}

func (h *logHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &logHandler{next: h.next.WithAttrs(attrs)}
}

func (h *logHandler) WithGroup(name string) slog.Handler {
	return &logHandler{next: h.next.WithGroup(name)}
}
