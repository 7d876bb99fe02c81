// Every update rule lrfuse registers. Adding an algorithm: a rule header beside these (see
// rule.h), one entry in LRFUSE_RULES, and its Python class (lrfuse/optim/).
#pragma once

#include "adadelta.h"
#include "adagrad.h"
#include "adam.h"
#include "rmsprop.h"
#include "sgd.h"

#define LRFUSE_RULES(X) X(Adam) X(RMSprop) X(SGD) X(Adagrad) X(Adadelta)
