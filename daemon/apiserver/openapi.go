package apiserver

import (
	"fmt"

	"github.com/emicklei/go-restful/v3"
	genericapiserver "k8s.io/apiserver/pkg/server"
	openapicommon "k8s.io/kube-openapi/pkg/common"
	"k8s.io/kube-openapi/pkg/common/restfuladapter"
)

// releaseOpenAPIBuilders keeps the OpenAPI builders from holding, for the
// life of the process, the definitions of every Kubernetes type (about 5 MB
// of heap each for OpenAPI v2 and v3, most of it types sovrad does not
// serve: kubelet, apps, batch, ...). A builder that finds a configuration
// with GetOperationIDAndTags and no GetOperationIDAndTagsFromRoute sets the
// latter to a function that holds the builder itself, its definitions with
// it, in the configuration the API server keeps (kube-openapi builder and
// builder3, newOpenAPI). cfg gets the same function first, holding nothing
// but GetOperationIDAndTags. Call it before the servers are built.
func releaseOpenAPIBuilders(cfg *genericapiserver.Config) {
	if c := cfg.OpenAPIConfig; c != nil && c.GetOperationIDAndTags != nil && c.GetOperationIDAndTagsFromRoute == nil {
		c.GetOperationIDAndTagsFromRoute = operationIDsFromRoute(c.GetOperationIDAndTags)
	}
	if c := cfg.OpenAPIV3Config; c != nil && c.GetOperationIDAndTags != nil && c.GetOperationIDAndTagsFromRoute == nil {
		c.GetOperationIDAndTagsFromRoute = operationIDsFromRoute(c.GetOperationIDAndTags)
	}
}

// operationIDsFromRoute is get for the routes the builders pass, which wrap
// go-restful's, as the builders' own function is.
func operationIDsFromRoute(get func(*restful.Route) (string, []string, error)) func(openapicommon.Route) (string, []string, error) {
	return func(r openapicommon.Route) (string, []string, error) {
		route, ok := r.(*restfuladapter.RouteAdapter)
		if !ok {
			return "", nil, fmt.Errorf("naming the OpenAPI operation of %s: not a go-restful route", r.Path())
		}
		return get(route.Route)
	}
}
