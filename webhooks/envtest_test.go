package webhooks

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/go-logr/logr/funcr"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	logf "sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// The API server of these tests: etcd and kube-apiserver from
// $KUBEBUILDER_ASSETS or <repo>/bin/cluster (built by hack/cluster-bins.sh),
// with the Mesh CRD and a ValidatingWebhookConfiguration pointing at
// ValidatePath on a local port. Started once, on first use, so the pure
// tests and fuzzing never pay for it.

const (
	testWebhookConfigName = "meshkeeper-validating-webhook"
	testWebhookName       = "vmesh.meshkeeper.dev"
)

var (
	testScheme = newTestScheme()

	envOnce sync.Once
	env     *envtest.Environment
	envCfg  *rest.Config
	envErr  error
)

func newTestScheme() *runtime.Scheme {
	s := runtime.NewScheme()
	utilruntime.Must(clientgoscheme.AddToScheme(s))
	utilruntime.Must(v1alpha1.AddToScheme(s))
	return s
}

func TestMain(m *testing.M) {
	code := m.Run()
	if env != nil {
		if err := env.Stop(); err != nil {
			println("stop envtest:", err.Error())
		}
	}
	os.Exit(code)
}

// clusterBinDir is where etcd and kube-apiserver are.
func clusterBinDir() string {
	if dir := os.Getenv("KUBEBUILDER_ASSETS"); dir != "" {
		return dir
	}
	abs, err := filepath.Abs(filepath.Join("..", "bin", "cluster"))
	if err != nil {
		return filepath.Join("..", "bin", "cluster")
	}
	return abs
}

// testAPIServer starts (once) and returns the test API server, or skips the
// test when its binaries are missing (fails instead when
// MESHKEEPER_REQUIRE_CLUSTER=1).
func testAPIServer(t *testing.T) (*envtest.Environment, *rest.Config, client.Client) {
	t.Helper()
	dir := clusterBinDir()
	if _, err := os.Stat(filepath.Join(dir, "kube-apiserver")); err != nil {
		msg := "needs etcd and kube-apiserver in " + dir + " (" + err.Error() + "): run hack/cluster-bins.sh or set KUBEBUILDER_ASSETS"
		if os.Getenv("MESHKEEPER_REQUIRE_CLUSTER") == "1" {
			t.Fatal(msg + "; MESHKEEPER_REQUIRE_CLUSTER=1 makes this a failure")
		}
		t.Skip(msg + "; set MESHKEEPER_REQUIRE_CLUSTER=1 to fail instead of skipping")
	}
	envOnce.Do(func() {
		logf.SetLogger(funcr.New(func(prefix, args string) { fmt.Fprintln(os.Stderr, prefix, args) }, funcr.Options{}))
		env = &envtest.Environment{
			BinaryAssetsDirectory: dir,
			CRDDirectoryPaths:     []string{filepath.Join("..", "config", "crd", "bases")},
			ErrorIfCRDPathMissing: true,
			Scheme:                testScheme,
			WebhookInstallOptions: envtest.WebhookInstallOptions{
				ValidatingWebhooks: []*admissionregistrationv1.ValidatingWebhookConfiguration{meshWebhookConfiguration()},
			},
		}
		envCfg, envErr = env.Start()
	})
	if envErr != nil {
		t.Fatalf("start test API server from %s: %v", dir, envErr)
	}
	c, err := client.New(envCfg, client.Options{Scheme: testScheme})
	if err != nil {
		t.Fatalf("client: %v", err)
	}
	return env, envCfg, c
}

// meshWebhookConfiguration is what config/webhook deploys: the Mesh
// validating webhook on creates and updates, failing closed. envtest
// replaces the service reference with its local URL.
func meshWebhookConfiguration() *admissionregistrationv1.ValidatingWebhookConfiguration {
	return &admissionregistrationv1.ValidatingWebhookConfiguration{
		ObjectMeta: metav1.ObjectMeta{Name: testWebhookConfigName},
		Webhooks: []admissionregistrationv1.ValidatingWebhook{{
			Name: testWebhookName,
			ClientConfig: admissionregistrationv1.WebhookClientConfig{
				Service: &admissionregistrationv1.ServiceReference{
					Namespace: "meshkeeper-system", Name: "meshkeeper-webhook", Path: ptr.To(ValidatePath),
				},
			},
			Rules: []admissionregistrationv1.RuleWithOperations{{
				Operations: []admissionregistrationv1.OperationType{admissionregistrationv1.Create, admissionregistrationv1.Update},
				Rule: admissionregistrationv1.Rule{
					APIGroups:   []string{v1alpha1.GroupVersion.Group},
					APIVersions: []string{v1alpha1.GroupVersion.Version},
					Resources:   []string{"meshes"},
					Scope:       ptr.To(admissionregistrationv1.ClusterScope),
				},
			}},
			FailurePolicy:           ptr.To(admissionregistrationv1.Fail),
			SideEffects:             ptr.To(admissionregistrationv1.SideEffectClassNone),
			AdmissionReviewVersions: []string{"v1"},
			TimeoutSeconds:          ptr.To[int32](10),
		}},
	}
}
