package cluster

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// ServiceAccountKubeconfig writes a kubeconfig that authenticates as the
// ServiceAccount namespace/name with a token from the TokenRequest API (as
// the kubelet mounts one into a pod), valid for ttl, and returns its path
// and the matching rest.Config. A process given it has exactly the
// ServiceAccount's permissions: what its RBAC grants and nothing else.
// The ServiceAccount must exist.
func (c *Cluster) ServiceAccountKubeconfig(ctx context.Context, namespace, name string, ttl time.Duration) (string, *rest.Config, error) {
	cs, err := kubernetes.NewForConfig(c.Config)
	if err != nil {
		return "", nil, err
	}
	secs := int64(ttl / time.Second)
	tr, err := cs.CoreV1().ServiceAccounts(namespace).CreateToken(ctx, name, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &secs},
	}, metav1.CreateOptions{})
	if err != nil {
		return "", nil, fmt.Errorf("token for ServiceAccount %s/%s: %w", namespace, name, err)
	}
	cfg := &rest.Config{
		Host:            c.Config.Host,
		BearerToken:     tr.Status.Token,
		TLSClientConfig: rest.TLSClientConfig{CAData: c.Config.CAData, CAFile: c.Config.CAFile},
		QPS:             c.Config.QPS,
		Burst:           c.Config.Burst,
	}
	ca := c.Config.CAData
	if len(ca) == 0 && c.Config.CAFile != "" {
		if ca, err = os.ReadFile(c.Config.CAFile); err != nil {
			return "", nil, err
		}
	}
	user := "system:serviceaccount:" + namespace + ":" + name
	kcfg := clientcmdapi.NewConfig()
	kcfg.Clusters["local"] = &clientcmdapi.Cluster{Server: c.Config.Host, CertificateAuthorityData: ca}
	kcfg.AuthInfos[user] = &clientcmdapi.AuthInfo{Token: tr.Status.Token}
	kcfg.Contexts["default"] = &clientcmdapi.Context{Cluster: "local", AuthInfo: user}
	kcfg.CurrentContext = "default"
	path := filepath.Join(c.tmpDir, "kubeconfig-"+namespace+"-"+name)
	if err := clientcmd.WriteToFile(*kcfg, path); err != nil {
		return "", nil, fmt.Errorf("write kubeconfig of %s: %w", user, err)
	}
	return path, cfg, nil
}
