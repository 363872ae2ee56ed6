// Command kubectl-meshkeeper is the kubectl plugin for meshkeeper (on the
// PATH, `kubectl meshkeeper ...` runs it):
//
//	kubectl meshkeeper status [--mesh default]   the rollout as a human reads it
//	kubectl meshkeeper plan -f mesh.yaml         what applying the file would do, without applying it
//
// It only reads from the cluster (get and list): `plan` runs the operator's
// own planner (internal/plan) on the file's spec and the live Mesh's
// status, nodes and namespaces, so it shows the steps the operator would
// take.
package main

import (
	"context"
	"crypto/ed25519"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"k8s.io/apimachinery/pkg/runtime"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
	"github.com/meshkeeper/meshkeeper/internal/bundle/oci"
)

const usage = `kubectl meshkeeper: the meshkeeper rollout, as a human reads it.

Commands:
  status [--mesh NAME]      the Mesh, its rollout (waves, nodes, SLO values and
                            thresholds), the plan, and the history
  plan -f FILE [--mesh NAME]
                            the dry run of FILE (a Mesh) against the live cluster:
                            the steps the operator would take; nothing is applied

  catalog push -d DIR --to oci://HOST/REPO:TAG --key KEY.pem [--plain-http]
                            publish a bundles tree as a signed catalog artifact
                            (what operators with --catalog-source poll)

Common flags: --kubeconfig FILE, --context NAME, --components-namespace NS
(istio-system). plan also takes --catalog-source REF --catalog-public-key FILE
[--catalog-plain-http] to plan against the operator's OCI catalog.
`

func main() {
	if err := run(context.Background(), os.Args[1:], os.Stdout, nil); err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		var fail *planFailed
		if errors.As(err, &fail) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

// options are the flags of every command.
type options struct {
	kubeconfig, context string
	mesh                string
	componentsNamespace string
	file                string
	catalogSource       string
	catalogPublicKey    string
	catalogPlainHTTP    bool
	now                 func() time.Time
	restConfigOverride  *rest.Config
}

// run is the plugin; cfg, when set, is used instead of a kubeconfig (tests).
func run(ctx context.Context, args []string, out io.Writer, cfg *rest.Config) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(out, usage)
		return nil
	}
	cmd := args[0]
	if cmd == "catalog" {
		if len(args) < 2 || args[1] != "push" {
			return fmt.Errorf("catalog: want catalog push\n\n%s", usage)
		}
		return catalogPush(ctx, args[2:], out)
	}
	fs := flag.NewFlagSet("kubectl meshkeeper "+cmd, flag.ContinueOnError)
	fs.SetOutput(out)
	o := options{now: time.Now, restConfigOverride: cfg}
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
	fs.StringVar(&o.context, "context", "", "kubeconfig context")
	fs.StringVar(&o.mesh, "mesh", "default", "the Mesh's name")
	fs.StringVar(&o.componentsNamespace, "components-namespace", "istio-system", "where the mesh components run")
	if cmd == "plan" {
		fs.StringVar(&o.file, "f", "", "the Mesh YAML to plan (required)")
		fs.StringVar(&o.catalogSource, "catalog-source", "", "plan against this OCI catalog too (as the manager's --catalog-source)")
		fs.StringVar(&o.catalogPublicKey, "catalog-public-key", "", "PEM ed25519 public key the catalog is signed with")
		fs.BoolVar(&o.catalogPlainHTTP, "catalog-plain-http", false, "plain HTTP to the catalog registry")
	}
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	switch cmd {
	case "status":
		return status(ctx, c, o, out)
	case "plan":
		if o.file == "" {
			return errors.New("plan: -f FILE is required: the Mesh YAML to plan")
		}
		cat, err := o.catalog(ctx)
		if err != nil {
			return err
		}
		return planFile(ctx, c, o, cat, out)
	}
	return fmt.Errorf("unknown command %q\n\n%s", cmd, usage)
}

func (o options) client() (client.Client, error) {
	cfg := o.restConfigOverride
	if cfg == nil {
		rules := clientcmd.NewDefaultClientConfigLoadingRules()
		rules.ExplicitPath = o.kubeconfig
		var err error
		cfg, err = clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{CurrentContext: o.context}).ClientConfig()
		if err != nil {
			return nil, fmt.Errorf("kubeconfig: %w", err)
		}
	}
	scheme := runtime.NewScheme()
	utilruntime.Must(clientgoscheme.AddToScheme(scheme))
	utilruntime.Must(meshv1.AddToScheme(scheme))
	return client.New(cfg, client.Options{Scheme: scheme})
}

// catalog is what plan resolves versions against: the embedded catalog, and
// with --catalog-source the OCI catalog merged in, as the manager does.
func (o options) catalog(ctx context.Context) (*bundle.Catalog, error) {
	if o.catalogSource == "" {
		return bundle.Default(), nil
	}
	var key ed25519.PublicKey
	if o.catalogPublicKey != "" {
		raw, err := os.ReadFile(o.catalogPublicKey)
		if err != nil {
			return nil, err
		}
		if key, err = oci.ParsePublicKey(raw); err != nil {
			return nil, fmt.Errorf("--catalog-public-key: %w", err)
		}
	}
	src, err := oci.NewSource(o.catalogSource, key, o.catalogPlainHTTP)
	if err != nil {
		return nil, err
	}
	remote, _, err := src.Pull(ctx)
	if err != nil {
		return nil, err
	}
	merged, err := bundle.Merge(bundle.Default(), remote)
	if err != nil {
		fmt.Fprintln(os.Stderr, "warning:", err)
	}
	return merged, nil
}
