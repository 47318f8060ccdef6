// Package controllers groups the agent's controllers by area; each area
// matches one package under agent/resources. The controllers run in the COSI
// runtime composed by agent/runtime.
package controllers
