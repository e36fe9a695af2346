"""The exact lists safe_pickle checks: classes a pickle may create (few may be called), pure functions, skops nodes."""

from __future__ import annotations

# module -> space-separated class names, exactly as pickles name them.
_CLASS_NAMES: dict[str, str] = {
    "builtins": "object bool int float complex str bytes bytearray tuple list dict set frozenset slice range",
    "collections": "OrderedDict defaultdict deque Counter",
    "functools": "partial",
    "joblib.numpy_pickle": "NumpyArrayWrapper",
    "numpy": "ndarray dtype bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 float32 float64 "
             "longdouble complex64 complex128 str_ bytes_ object_ void",
    "numpy.random.mtrand": "RandomState",
    "numpy.random._generator": "Generator",
    "numpy.random._mt19937": "MT19937",
    "numpy.random._pcg64": "PCG64 PCG64DXSM",
    "numpy.random._philox": "Philox",
    "numpy.random._sfc64": "SFC64",
    "numpy.random.bit_generator": "SeedSequence",
    "scipy.sparse._csr": "csr_matrix csr_array",
    "scipy.sparse._csc": "csc_matrix csc_array",
    "scipy.sparse._coo": "coo_matrix coo_array",
    "scipy.interpolate._bsplines": "BSpline",
    "xgboost.sklearn": "XGBModel XGBClassifier XGBRegressor XGBRanker XGBRFClassifier XGBRFRegressor",
    "xgboost.core": "Booster",
    "lightgbm.sklearn": "LGBMModel LGBMClassifier LGBMRegressor LGBMRanker",
    "lightgbm.basic": "Booster",
    "sklearn._loss._loss": "CyAbsoluteError CyExponentialLoss CyHalfBinomialLoss CyHalfGammaLoss "
                           "CyHalfMultinomialLoss CyHalfPoissonLoss CyHalfSquaredError CyHalfTweedieLoss "
                           "CyHalfTweedieLossIdentity CyHuberLoss CyPinballLoss",
    "sklearn._loss.link": "HalfLogitLink IdentityLink Interval LogLink LogitLink MultinomialLogit",
    "sklearn._loss.loss": "AbsoluteError ExponentialLoss HalfBinomialLoss HalfGammaLoss HalfMultinomialLoss "
                          "HalfPoissonLoss HalfSquaredError HalfTweedieLoss HalfTweedieLossIdentity HuberLoss "
                          "PinballLoss",
    "sklearn.calibration": "CalibratedClassifierCV _CalibratedClassifier _SigmoidCalibration",
    "sklearn.cluster._birch": "Birch _CFNode _CFSubcluster",
    "sklearn.cluster._bisect_k_means": "BisectingKMeans _BisectingTree",
    "sklearn.cluster._kmeans": "KMeans MiniBatchKMeans",
    "sklearn.compose._column_transformer": "ColumnTransformer",
    "sklearn.compose._target": "TransformedTargetRegressor",
    "sklearn.cross_decomposition._pls": "CCA PLSCanonical PLSRegression",
    "sklearn.decomposition._dict_learning": "DictionaryLearning",
    "sklearn.decomposition._factor_analysis": "FactorAnalysis",
    "sklearn.decomposition._fastica": "FastICA",
    "sklearn.decomposition._incremental_pca": "IncrementalPCA",
    "sklearn.decomposition._kernel_pca": "KernelPCA",
    "sklearn.decomposition._lda": "LatentDirichletAllocation",
    "sklearn.decomposition._nmf": "NMF",
    "sklearn.decomposition._pca": "PCA",
    "sklearn.decomposition._sparse_pca": "MiniBatchSparsePCA SparsePCA",
    "sklearn.decomposition._truncated_svd": "TruncatedSVD",
    "sklearn.discriminant_analysis": "LinearDiscriminantAnalysis QuadraticDiscriminantAnalysis",
    "sklearn.dummy": "DummyClassifier DummyRegressor",
    "sklearn.ensemble._bagging": "BaggingClassifier BaggingRegressor",
    "sklearn.ensemble._forest": "ExtraTreesClassifier ExtraTreesRegressor RandomForestClassifier "
                                "RandomForestRegressor",
    "sklearn.ensemble._gb": "GradientBoostingClassifier GradientBoostingRegressor",
    "sklearn.ensemble._hist_gradient_boosting.binning": "_BinMapper",
    "sklearn.ensemble._hist_gradient_boosting.gradient_boosting": "HistGradientBoostingClassifier "
                                                                  "HistGradientBoostingRegressor",
    "sklearn.ensemble._hist_gradient_boosting.predictor": "TreePredictor",
    "sklearn.ensemble._iforest": "IsolationForest",
    "sklearn.ensemble._stacking": "StackingClassifier StackingRegressor",
    "sklearn.ensemble._voting": "VotingClassifier VotingRegressor",
    "sklearn.ensemble._weight_boosting": "AdaBoostClassifier AdaBoostRegressor",
    "sklearn.feature_extraction.text": "CountVectorizer TfidfTransformer TfidfVectorizer",
    "sklearn.feature_selection._from_model": "SelectFromModel",
    "sklearn.feature_selection._rfe": "RFE RFECV",
    "sklearn.feature_selection._univariate_selection": "GenericUnivariateSelect SelectFdr SelectFpr SelectFwe "
                                                       "SelectKBest SelectPercentile",
    "sklearn.feature_selection._variance_threshold": "VarianceThreshold",
    "sklearn.gaussian_process._gpc": "GaussianProcessClassifier _BinaryGaussianProcessClassifierLaplace",
    "sklearn.gaussian_process._gpr": "GaussianProcessRegressor",
    "sklearn.gaussian_process.kernels": "CompoundKernel ConstantKernel DotProduct ExpSineSquared Exponentiation "
                                        "Matern PairwiseKernel Product RBF RationalQuadratic Sum WhiteKernel",
    "sklearn.impute._base": "MissingIndicator SimpleImputer",
    "sklearn.impute._knn": "KNNImputer",
    "sklearn.isotonic": "IsotonicRegression",
    "sklearn.kernel_approximation": "Nystroem RBFSampler",
    "sklearn.kernel_ridge": "KernelRidge",
    "sklearn.linear_model._base": "LinearRegression",
    "sklearn.linear_model._bayes": "ARDRegression BayesianRidge",
    "sklearn.linear_model._coordinate_descent": "ElasticNet ElasticNetCV Lasso LassoCV",
    "sklearn.linear_model._glm.glm": "GammaRegressor PoissonRegressor TweedieRegressor",
    "sklearn.linear_model._huber": "HuberRegressor",
    "sklearn.linear_model._least_angle": "Lars LarsCV LassoLars LassoLarsCV LassoLarsIC",
    "sklearn.linear_model._logistic": "LogisticRegression LogisticRegressionCV",
    "sklearn.linear_model._omp": "OrthogonalMatchingPursuit OrthogonalMatchingPursuitCV",
    "sklearn.linear_model._passive_aggressive": "PassiveAggressiveClassifier PassiveAggressiveRegressor",
    "sklearn.linear_model._perceptron": "Perceptron",
    "sklearn.linear_model._quantile": "QuantileRegressor",
    "sklearn.linear_model._ransac": "RANSACRegressor",
    "sklearn.linear_model._ridge": "Ridge RidgeCV RidgeClassifier RidgeClassifierCV",
    "sklearn.linear_model._sgd_fast": "EpsilonInsensitive Hinge ModifiedHuber SquaredEpsilonInsensitive "
                                      "SquaredHinge",
    "sklearn.linear_model._stochastic_gradient": "SGDClassifier SGDOneClassSVM SGDRegressor",
    "sklearn.linear_model._theil_sen": "TheilSenRegressor",
    "sklearn.metrics._dist_metrics": "ChebyshevDistance64 EuclideanDistance64 ManhattanDistance64 "
                                     "MinkowskiDistance64",
    "sklearn.mixture._bayesian_mixture": "BayesianGaussianMixture",
    "sklearn.mixture._gaussian_mixture": "GaussianMixture",
    "sklearn.multiclass": "OneVsOneClassifier OneVsRestClassifier OutputCodeClassifier _ConstantPredictor",
    "sklearn.multioutput": "ClassifierChain MultiOutputClassifier MultiOutputRegressor RegressorChain",
    "sklearn.naive_bayes": "BernoulliNB CategoricalNB ComplementNB GaussianNB MultinomialNB",
    "sklearn.neighbors._ball_tree": "BallTree",
    "sklearn.neighbors._classification": "KNeighborsClassifier RadiusNeighborsClassifier",
    "sklearn.neighbors._graph": "KNeighborsTransformer",
    "sklearn.neighbors._kd_tree": "KDTree",
    "sklearn.neighbors._kde": "KernelDensity",
    "sklearn.neighbors._lof": "LocalOutlierFactor",
    "sklearn.neighbors._nearest_centroid": "NearestCentroid",
    "sklearn.neighbors._regression": "KNeighborsRegressor RadiusNeighborsRegressor",
    "sklearn.neighbors._unsupervised": "NearestNeighbors",
    "sklearn.neural_network._multilayer_perceptron": "MLPClassifier MLPRegressor",
    "sklearn.neural_network._rbm": "BernoulliRBM",
    "sklearn.neural_network._stochastic_optimizers": "AdamOptimizer SGDOptimizer",
    "sklearn.pipeline": "FeatureUnion Pipeline",
    "sklearn.preprocessing._data": "Binarizer KernelCenterer MaxAbsScaler MinMaxScaler Normalizer PowerTransformer "
                                   "QuantileTransformer RobustScaler StandardScaler",
    "sklearn.preprocessing._discretization": "KBinsDiscretizer",
    "sklearn.preprocessing._encoders": "OneHotEncoder OrdinalEncoder",
    "sklearn.preprocessing._function_transformer": "FunctionTransformer",
    "sklearn.preprocessing._label": "LabelBinarizer LabelEncoder",
    "sklearn.preprocessing._polynomial": "PolynomialFeatures SplineTransformer",
    "sklearn.preprocessing._target_encoder": "TargetEncoder",
    "sklearn.random_projection": "GaussianRandomProjection SparseRandomProjection",
    "sklearn.svm._classes": "LinearSVC LinearSVR NuSVC NuSVR OneClassSVM SVC SVR",
    "sklearn.tree._classes": "DecisionTreeClassifier DecisionTreeRegressor ExtraTreeClassifier ExtraTreeRegressor",
    "sklearn.tree._tree": "Tree",
    "sklearn.utils._bunch": "Bunch",
}

# Classes a pickle calls (REDUCE) rather than creates with NEWOBJ; their constructors only allocate.
_CALLED_CLASS_NAMES = {
    "builtins": "object bool int float complex str bytes bytearray tuple list dict set frozenset slice range",
    "collections": "OrderedDict defaultdict deque Counter",
    "functools": "partial",
    "numpy": "dtype",
    "sklearn._loss._loss": _CLASS_NAMES["sklearn._loss._loss"],
    "sklearn.linear_model._sgd_fast": _CLASS_NAMES["sklearn.linear_model._sgd_fast"],
    "sklearn.tree._tree": "Tree",
}

# Pure functions models store as parameters: referenced by a pickle, never called while loading.
_STORED_FUNCTION_NAMES = {
    "numpy": "abs absolute exp exp2 expm1 log log10 log1p log2 sqrt square cbrt reciprocal negative sign "
             "sin cos tan tanh sinh cosh arcsinh arctan floor ceil rint",
    "scipy.special._ufuncs": "logit",
    "scipy.special._special_ufuncs": "expit logit",
    "scipy._lib.array_api_compat.numpy._aliases": "asarray",  # scipy's BSpline keeps its array namespace
    "sklearn.feature_selection._univariate_selection": "chi2 f_classif f_oneway f_regression r_regression",
    "sklearn.feature_selection._mutual_info": "mutual_info_classif mutual_info_regression",
    "sklearn.utils.validation": "check_array",  # HistGradientBoosting keeps partial(check_array, dtype=...)
    "sklearn.cluster._kmeans": "_kmeans_single_elkan _kmeans_single_lloyd",  # BisectingKMeans' chosen algorithm
}

# Protocol 0-2 pickles written by Python 2 name these modules; numpy 1.x pickles name numpy.core.
MODULE_ALIASES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


def _names(table: dict[str, str]) -> frozenset[tuple[str, str]]:
    return frozenset((module, name) for module, names in table.items() for name in names.split())


CLASS_NAMES = _names(_CLASS_NAMES)
CALLED_CLASS_NAMES = _names(_CALLED_CLASS_NAMES)
STORED_FUNCTION_NAMES = _names(_STORED_FUNCTION_NAMES)

# skops node kinds that only hold data or name a listed type; MethodNode and OperatorFuncNode (bound methods,
# operator.attrgetter/methodcaller) are call gadgets and are never trusted.
SKOPS_DATA_LOADERS = frozenset({
    "DictNode", "ListNode", "TupleNode", "SetNode", "JsonNode", "BytesNode", "BytearrayNode", "SliceNode",
    "DefaultDictNode", "FunctionNode", "TypeNode", "ObjectNode", "PartialNode", "DTypeNode", "NdArrayNode",
    "RandomStateNode", "RandomGeneratorNode", "SparseMatrixNode", "_DictWithDeprecatedKeysNode",
})
# Node kinds that call their type with arguments from the file: only the classes pickles may call.
SKOPS_CALLING_LOADERS = frozenset({"ReduceNode", "TreeNode", "LossNode", "ConstructorFromReduceNode"})
